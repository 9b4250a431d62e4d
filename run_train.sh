#!/usr/bin/env bash
# Launch titan_llava training with torchrun.
#   NGPU=8 CONFIG_FILE=train_configs/llava_next_vicuna7b_pretrain.toml ./run_train.sh [--section.key value ...]
# Extra arguments are passed through as config overrides.
# Multi-node: NNODES=N RDZV_ENDPOINT=host:port [RDZV_ID=job-id] on every node (c10d rendezvous).
# Exit status: 0 done, 2 config/input error, 3 a non-finite loss or gradient norm (the step was not
# applied; see docs/checkpointing.md before resuming), 75 preempted by SIGTERM after saving a checkpoint (run
# the same command to resume), 143 stopped by SIGTERM with checkpointing off (nothing saved),
# anything else a failure. SIGTERM/SIGINT sent to this script are
# forwarded to torchrun, which forwards them to the workers.
set -uo pipefail

NGPU=${NGPU:-8}
NNODES=${NNODES:-1}
CONFIG_FILE=${CONFIG_FILE:-"./train_configs/debug_model.toml"}
RDZV_ID=${RDZV_ID:-"titan_llava"}

if [ "$NNODES" -gt 1 ]; then
  if [ -z "${RDZV_ENDPOINT:-}" ]; then
    # Without it every node would wait for the others on a store of its own, silently.
    echo "run_train.sh: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the same on every node)" >&2
    exit 2
  fi
  rdzv_args=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID")
else
  rdzv_args=(--standalone)
fi

export PYTHONUNBUFFERED=1
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
# The CUDA caching allocator grows segments in place instead of freeing its cache and retrying
# when memory is near full or fragmented (a cudaFree stalls the device: round 7's stage-1 trace,
# benchmarks/README.md). Set PYTORCH_ALLOC_CONF or PYTORCH_CUDA_ALLOC_CONF (even to "", the
# allocator's defaults) to choose otherwise.
if [ -z "${PYTORCH_ALLOC_CONF+set}" ] && [ -z "${PYTORCH_CUDA_ALLOC_CONF+set}" ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
fi
# torchrun reports any worker failure as 1; the workers write the trainer's own status here.
status_file=$(mktemp)
trap 'rm -f "$status_file" "$status_file".*' EXIT
export TITAN_LLAVA_STATUS_FILE="$status_file"

# A signal that comes before torchrun's pid is known is kept, and forwarded once it is.
pending=""
signalled=""
trap 'pending=1' TERM INT
torchrun --nnodes "$NNODES" --nproc_per_node "$NGPU" "${rdzv_args[@]}" \
  --local-ranks-filter "${LOG_RANK:-0}" --role rank --tee 3 \
  -m titan_llava.train --job.config_file "$CONFIG_FILE" "$@" &
pid=$!
trap 'signalled=1; kill -TERM "$pid" 2>/dev/null' TERM INT
if [ -n "$pending" ]; then
  signalled=1
  kill -TERM "$pid" 2>/dev/null
fi
rc=0
wait "$pid" || rc=$?
# A trapped signal interrupts `wait`; keep waiting until torchrun has really exited.
while kill -0 "$pid" 2>/dev/null; do
  rc=0
  wait "$pid" || rc=$?
done
# torchrun killed outright (SIGKILL, the OOM killer) leaves its workers running: they stop on their
# own within seconds (titan_llava/launcher_watch.py), save a checkpoint and report 75. Wait for every
# worker of this node (each locks a marker beside the status file while it lives), so that the status
# is theirs and a job restarted after this script never overlaps with them.
# torchrun's pid is reaped: a signal from now on must not go to it (the number may be reused).
trap 'signalled=1' TERM INT
# A marker names a live worker while that worker holds its flock (titan_llava/train.py): a dead
# one (SIGKILLed, aborted, an unreaped zombie) holds none, nor does a process that reused its pid.
marker_live() {
  local fd held=1
  [ -e "$1" ] || return 1
  if command -v flock >/dev/null; then
    { exec {fd}<"$1"; } 2>/dev/null || return 1  # removed meanwhile: that worker has finished
    flock -n "$fd" && held=""
    exec {fd}<&-
    [ -n "$held" ]
  else
    kill -0 "${1##*.}" 2>/dev/null
  fi
}
# Also when a status is written already: a worker still alive may still be writing.
said=""
while :; do
  alive=""
  for marker in "$status_file".alive.*; do
    if marker_live "$marker"; then
      alive=1
      break
    fi
  done
  [ -z "$alive" ] && break
  if [ -z "$said" ]; then
    echo "run_train.sh: torchrun exited (status $rc) while workers still run; waiting for them" \
      "to stop (they save a checkpoint first)" >&2
    said=1
  fi
  sleep 1
done
# First line: the trainer's exit status; any further lines: its error message, repeated here because
# torchrun may have stopped rank 0 (the rank whose output is shown) before it printed it.
status=$(head -n 1 "$status_file" 2>/dev/null || true)
if [ -n "$status" ] && [ "$status" != "0" ]; then
  message=$(tail -n +2 "$status_file" 2>/dev/null || true)
  if [ -n "$message" ]; then
    echo "run_train.sh: titan_llava.train exited with status $status: $message" >&2
  fi
  exit "$status"
fi
# Stopped by the signal before any worker reported (torchrun still starting, or a worker killed
# after the grace period): the newest complete checkpoint is intact, so a requeue resumes from it.
if [ -z "$status" ] && [ -n "$signalled" ]; then
  echo "run_train.sh: stopped by SIGTERM/SIGINT before the trainer reported a status (torchrun" \
    "status $rc); exiting with 75: the same command resumes from the newest complete checkpoint" >&2
  exit 75
fi
# Status 0 is written only after the final barrier that every rank reaches once training is done,
# so a failure torchrun still reports came from a process's teardown, after the run was complete.
if [ "$status" = "0" ] && [ "$rc" != "0" ]; then
  echo "run_train.sh: the run completed on every rank, but a worker failed while exiting" \
    "(torchrun status $rc); its checkpoints and outputs are complete" >&2
  exit 0
fi
exit "$rc"
