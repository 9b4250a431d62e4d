#!/usr/bin/env bash
# Launch titan_llava training with torchrun.
#   NGPU=8 CONFIG_FILE=train_configs/llava_next_vicuna7b_pretrain.toml ./run_train.sh [--section.key value ...]
# Multi-node: set NNODES, NODE_RANK (or use a rendezvous) and RDZV_ENDPOINT=host:port on every node.
# Extra arguments are passed through as config overrides.
set -euo pipefail

NGPU=${NGPU:-8}
NNODES=${NNODES:-1}
CONFIG_FILE=${CONFIG_FILE:-"./train_configs/debug_model.toml"}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-"localhost:0"}
RDZV_ID=${RDZV_ID:-"titan_llava"}

if [ "$NNODES" -gt 1 ]; then
  rdzv_args=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID")
else
  rdzv_args=(--standalone)
fi

export PYTHONUNBUFFERED=1
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}

exec torchrun --nnodes "$NNODES" --nproc_per_node "$NGPU" "${rdzv_args[@]}" \
  --local-ranks-filter "${LOG_RANK:-0}" --role rank --tee 3 \
  -m titan_llava.train --job.config_file "$CONFIG_FILE" "$@"
