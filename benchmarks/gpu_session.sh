#!/usr/bin/env bash
# One device call of the throughput plan, on a lent GPU machine (its image: CPython 3.12, torch,
# no torchdata, no flash-attention 4, no network), from the repository root:
#
#   PLAN=round8 BUDGET_S=560 benchmarks/gpu_session.sh            (first call; timeout_s ~590)
#   PLAN=round8 BUDGET_S=... ONLY="name ..." benchmarks/gpu_session.sh   (the plan's tail, warm machine,
#                                                                        if `status` leaves the time)
#
# BUDGET_S covers the whole call, installs included; a run is started only if its limit (+10 s
# of kill grace) fits. summary.txt under $OUT is kept current line by line, so a call killed at
# its time limit still returns what had finished. With 15 minutes of device time a session (the
# machine's start included), the tail call rarely fits: the plan's order puts first what decides.
#
# carrying [".wheels", ".fa4"] (`.wheels`: `pip download torchdata==0.11.0 --no-deps -d .wheels`;
# `.fa4`: `benchmarks/fa4_site.sh build`; both git-ignored). It
# 1. installs torchdata into /tmp/site and, where .fa4 is present, flash-attention 4 into
#    /tmp/fa4_site, and says whether flash_attn.cute imports (with the error if it does not);
# 2. runs benchmarks/train_throughput_gpu.sh with the results in a folder of this call;
# 3. returns them under $OUT, within what a device call brings back (8 files of at most 16 MiB):
#    summary.txt, logs.tgz (every log and kernel_profile.json, not the traces) and each profiled
#    run's trace.json.gz as <run>.trace.json.gz, where it is under 16 MiB.
# The inductor cache and the FA4 kernel cache persist across calls on one warm machine; a fresh
# machine starts without them. Extra environment (FLAVOR, STEPS, EXTRA) passes through.
set -uo pipefail
: "${OUT:?OUT (the folder a device call returns) is not set}"
: "${PLAN:?set PLAN (e.g. round8)}"
export PYTHONUNBUFFERED=1

if [[ ! -d /tmp/site/torchdata ]]; then
  pip install -q --no-deps --target /tmp/site .wheels/*.whl || echo "gpu_session: torchdata install failed"
fi
export PYTHONPATH=/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}
if [[ -f .fa4/site.tar.xz ]]; then
  if [[ ! -d /tmp/fa4_site/flash_attn ]]; then
    exports=$(benchmarks/fa4_site.sh install .fa4 /tmp/fa4_site) || echo "gpu_session: fa4 install failed"
  else
    exports="export PYTHONPATH=/tmp/fa4_site:/tmp/fa4_site/nvidia_cutlass_dsl/dsl_packages\${PYTHONPATH:+:\$PYTHONPATH}"
  fi
  eval "${exports:-}"
fi
python - <<'EOF'
import torch
print(f"gpu_session: torch {torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'}")
try:
    import torchdata  # noqa: F401
    print("gpu_session: torchdata", torchdata.__version__)
except Exception as e:  # noqa: BLE001
    print(f"gpu_session: torchdata missing: {type(e).__name__}: {e}")
try:
    import flash_attn.cute.interface  # noqa: F401
    print("gpu_session: flash_attn.cute imports")
except Exception as e:  # noqa: BLE001
    print(f"gpu_session: flash_attn.cute does not import: {type(e).__name__}: {e}")
EOF

results=/tmp/results_$(date +%s)
# BUDGET_S covers this whole call: the installs and import checks above count against it.
# The summary is kept current under $OUT (a call killed at its limit returns only $OUT).
returned=$OUT
OUT=$results BUDGET_S=$(( ${BUDGET_S:-390} - SECONDS )) SUMMARY_COPY="$returned/summary.txt" \
  benchmarks/train_throughput_gpu.sh
rc=$?
tar czf "$OUT/logs.tgz" --exclude=trace.json.gz -C "$results" .
for d in "$results"/prof_*; do
  [[ -f $d/trace.json.gz ]] || continue
  if (( $(stat -c %s "$d/trace.json.gz") < 16 * 1024 * 1024 )); then
    cp "$d/trace.json.gz" "$OUT/$(basename "$d").trace.json.gz"
  else
    echo "gpu_session: $(basename "$d")/trace.json.gz is over 16 MiB: not returned" | tee -a "$OUT/summary.txt"
  fi
done
echo "gpu_session: plan exited $rc; returned: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
