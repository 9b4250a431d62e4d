#!/usr/bin/env bash
# The GPU measurement of benchmarks/train_throughput.py in one go (one H100/H200): stage 1 at the
# full 7B, stage 2 at the real 7B width with 8 LLM layers, eager then per-block compile, then
# stage 1 without packing. Each run has its own time limit and log; runs that would not fit in
# BUDGET_S seconds are skipped; ONLY='name ...' runs just the named runs of a plan. Dry run on CPU: FLAVOR=debug EXTRA='--steps 1 --warmup 1'.   OUT=results_dir BUDGET_S=400 benchmarks/train_throughput_gpu.sh
# PLAN=round2: packed rows on torch's varlen kernel vs the dense mask, no packing, selective AC
# (stage 1 only, STEPS=6 measured steps; runs benchmarks/varlen_parity.py first).
# PLAN=round3: stage 1 with bf16 storage of the frozen parts, one long packed row per micro-batch
# (no padding; benchmarks/packing_efficiency.py), without AC at 8192 tokens and, compiled, at 16384
# (benchmarks/activation_memory.py: 32 / 46 GiB of activations), selective AC at 16384.
# PLAN=round4: round 3's lost runs after the compile and device-assert fixes.
# PLAN=round5: after the host-sync removals (sync count, best configs, SAC + compile, unpacked stage 2).
# PLAN=round6: the stage-1 best with each before of the changes since round 4 (--no-defer-check: one
# host sync per step; --no-trim-last-block; --full-logits: the head and fp32 CE on every position),
# with parallelism.replicate_frozen (on one GPU: no FSDP copies and hooks for the frozen parts),
# kernel profiles (--profile) of the best stage-1 and stage-2 configs, stage 2 at the FULL depth with
# a state-free SGD standing in for AdamW (--sgd-standin), stage 2 without AC and with the vision
# tower as one FSDP unit, the sync count.
# PLAN=round7: what round 6 left (see the plan's comment).
# PLAN=round7h200: stage 2 at the full depth with the real AdamW on one H200 (see the plan's comment).
# PLAN=round8: flash-attention 4 for stage 1 where installed, the allocator's expandable segments
# against its defaults, stage 2's profile at the full depth, and what round 7 left (see the plan's
# comment).
# PLAN=round9: after round 8: the profiles with FA4, the same-call before/afters still missing (see
# the plan's comment).
# PLAN=round3s2: stage 2 (8 layers, compiled) packed vs not. PLAN=round3h200: stage 2 at full depth
# (7B fp32 master weights + AdamW state ~108 GB: needs an H200, kind nvidia-h200).
set -uo pipefail
OUT=${OUT:-./bench_out}
BUDGET_S=${BUDGET_S:-390}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
B="python benchmarks/train_throughput.py --flavor ${FLAVOR:-llava-next-vicuna-7b} --samples 400 --num-workers 8 --warmup 3"
S1="--stage 1 --local-batch-size 4 --steps 8"
S2="--stage 2 --llm-layers 8 --local-batch-size 2 --grad-accum 2 --steps 6"

# SUMMARY_COPY (gpu_session.sh): a second copy of the summary, in the folder a device call returns,
# kept current after every line so that a call killed at its time limit still returns it.
log() { tee -a "$OUT/summary.txt" ${SUMMARY_COPY:+"$SUMMARY_COPY"}; }

timed() {  # name limit_s command...: run it under a time limit (skipped if BUDGET_S has no room), log to $OUT/name.log
  local name=$1 limit=$2
  shift 2
  if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then
    return 1  # ONLY="name ...": run just these (a second call on a warm machine picks up a plan's tail)
  fi
  # timeout -k 10: a run that ignores SIGTERM (the trainer's handler finishes its step, a compile
  # finishes its graph) ends up to 10 s after its limit.
  if (( SECONDS + limit + 10 > BUDGET_S )); then
    echo "skip $name: $((BUDGET_S - SECONDS)) s left" | log
    return 1
  fi
  echo "== $name (limit ${limit}s): $*" | log
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "rc $? after ${SECONDS}s" | log
}

run() {  # name limit_s args...: benchmarks/train_throughput.py with the shared flags; its figures go
  # to the summary. RUN_ENV="VAR=value ..." in front of a call sets environment for that run alone.
  local name=$1
  timed "$1" "$2" env ${RUN_ENV:-} $B "${@:3}" ${EXTRA:-} || return 0
  grep -E "^(config|samples/s|text tokens|image tokens|tokens/s|MFU|step |peak memory|allocator|vision batches|vision ms per|ratio|full-depth|OPTIMIZER|model TFLOP|host syncs|  +[0-9]+  |kernel profile|top [0-9]+ by|  [a-z/() ]+ +[0-9.]+ ms|  total |  device busy| +[0-9]+\.[0-9]+ +[0-9]+\.[0-9]  )" \
    "$OUT/$name.log" | log
  tail -n 3 "$OUT/$name.log" | grep -iE "error|Traceback|Killed" | log
  return 0  # (pipefail: grep finding no error made a clean run return 1, and the plan exit 1)
}

micro() {  # name limit_s command...: a micro-benchmark script; its last MICRO_TAIL (12) lines go to the summary
  local name=$1
  timed "$@" || return 0
  tail -n "${MICRO_TAIL:-12}" "$OUT/$name.log" | log
}

parity() {  # limit_s: benchmarks/varlen_parity.py (CUDA only; skipped in the CPU dry run)
  [[ ${FLAVOR:-} == debug ]] && return
  echo "== varlen_parity" | tee -a "$OUT/summary.txt"
  timeout -k 5 "$1" python benchmarks/varlen_parity.py >"$OUT/varlen_parity.log" 2>&1
  echo "rc $? after ${SECONDS}s" | tee -a "$OUT/summary.txt"
  grep -E "route|diff|attention fwd|PARITY|Error" "$OUT/varlen_parity.log" | tee -a "$OUT/summary.txt"
}

defer_probe() {  # limit_s: the deferred step check on this device (fused AdamW's found_inf on FSDP2
  # parameters): a NaN at step 3 must stop the run with the parameters and AdamW state step 3
  # started from. If it fails, every later run gets --no-defer-check, so that the plan still
  # measures something. Also prints the host syncs (sync-debug) of the steps read a step later:
  # expected 0 (debug config: unpacked fp32 rows).
  local out="$OUT/defer_probe.json"
  rm -f "$out"
  timed defer_probe "$1" env TITAN_LLAVA_FAULT=nan_loss@3 python -m tests.train.step_check_probe "$out" \
    --job.config_file train_configs/debug_model.toml --job.dump_folder "$OUT/defer_probe" \
    --training.steps 6 --metrics.log_freq 5 --checkpoint.enable false --optimizer.implementation fused || return 0
  if python -c "import json, sys; r = json.load(open(sys.argv[1])); print('defer_probe:', {k: r[k] for k in ('defer_check', 'reads', 'error', 'final_equals_start_of', 'syncs_in_deferred_steps', 'syncs_by_step', 'sync_sites')}); sys.exit(not (r['error'] or '').startswith('step 3: non-finite') or r['final_equals_start_of'] != [3, 4])" "$out" 2>&1 | log; then
    echo "defer_probe: OK" | log
  else
    echo "defer_probe: FAILED (see defer_probe.log): later runs use --no-defer-check" | log
    tail -n 5 "$OUT/defer_probe.log" | log
    EXTRA="${EXTRA:-} --no-defer-check"
  fi
}

case ${PLAN:-round1} in
round1)  # compile and packing before/after (README, first table)
  run s1_eager 75 $S1
  run s2_eager 75 $S2
  run s1_compile 120 $S1 --compile
  run s2_compile 120 $S2 --compile
  run s1_eager_nopack 60 $S1 --no-packing
  ;;
round2)  # packed rows on torch's varlen kernel vs the dense mask; stage 1 AC policies
  S1="--stage 1 --local-batch-size 4 --steps ${STEPS:-6}"
  parity 30
  run s1_pack_dense 50 $S1 --no-torch-varlen
  run s1_pack_varlen 40 $S1
  run s1_nopack 40 $S1 --no-packing
  run s1_pack_varlen_sac 40 $S1 --ac selective
  run s1_pack_varlen_noac 35 $S1 --ac none
  ;;
round3)  # stage 1: frozen bf16 storage; 1 x 16384-token packed rows; AC none (+ compile)
  S1="--stage 1 --steps ${STEPS:-6}"
  parity 90
  P1="--local-batch-size 1 --data.packing_row_len 16384"
  run s1_nopack_frozen32 45 $S1 --local-batch-size 4 --no-packing --training.frozen_param_dtype float32
  run s1_nopack 45 $S1 --local-batch-size 4 --no-packing
  run s1_pack16k 50 $S1 $P1
  run s1_pack8k_noac 45 $S1 --local-batch-size 1 --data.packing_row_len 8192 --ac none
  run s1_pack16k_noac_compile 100 $S1 $P1 --ac none --compile
  run s1_pack16k_sacop 50 $S1 $P1 --ac selective
  run s1_pack8k_syncs 45 --stage 1 --steps 3 --local-batch-size 1 --data.packing_row_len 8192 --sync-debug
  ;;
round4)  # after the compile fix (fullgraph, static gqa, a compile cache per block class) and the
  # device-assert message fix that stopped round 3's 16384-token rows: the runs round 3 lost
  S1="--stage 1 --steps ${STEPS:-6}"
  S2="--stage 2 --llm-layers 8 --grad-accum 2 --steps ${STEPS:-6} --compile"
  P1="--local-batch-size 1 --data.packing_row_len 16384"
  parity 90
  run s1_pack16k_noac_compile 100 $S1 $P1 --ac none --compile
  run s2_nopack 90 $S2 --local-batch-size 2 --no-packing
  run s2_pack8k 90 $S2 --local-batch-size 1 --data.packing_row_len 8192
  run s1_pack16k 45 $S1 $P1
  run s1_pack8k_syncs 45 --stage 1 --steps 3 --local-batch-size 1 --data.packing_row_len 8192 --sync-debug
  run s1_pack16k_sacop 45 $S1 $P1 --ac selective
  run s2_pack8k_sacop 90 $S2 --local-batch-size 1 --data.packing_row_len 8192 --ac selective
  run s1_nopack_compile 90 $S1 --local-batch-size 4 --no-packing --compile
  ;;
round5)  # after the host-sync removals: the sync count (expect 1 per step + the last step's log),
  # the best configs again (same-call baselines), selective AC under compile, unpacked stage 2
  S1="--stage 1 --steps ${STEPS:-6}"
  S2="--stage 2 --llm-layers 8 --grad-accum 2 --steps ${STEPS:-6} --compile"
  P1="--local-batch-size 1 --data.packing_row_len 16384"
  run s1_pack8k_syncs 45 --stage 1 --steps 3 --local-batch-size 1 --data.packing_row_len 8192 --sync-debug
  run s1_pack16k_noac_compile 100 $S1 $P1 --ac none --compile
  run s1_pack16k_sacop_compile 100 $S1 $P1 --ac selective --compile
  run s2_pack8k_sacop 100 $S2 --local-batch-size 1 --data.packing_row_len 8192 --ac selective
  run s2_nopack 160 $S2 --local-batch-size 2 --no-packing
  ;;
round6)  # the deferred step check, replicate_frozen, the last-block trim, logits at loss positions,
  # stage 2 without AC and with the tower as one FSDP unit, where the device time goes (kernel
  # profiles; not figures). Ordered by priority (the tail is skipped when BUDGET_S runs out):
  # compiled stage-2 runs take ~90 s each, compiled stage-1 ~45 s, later runs reuse the cache
  S1="--stage 1 --steps ${STEPS:-6}"
  S2="--stage 2 --llm-layers 8 --grad-accum 2 --steps ${STEPS:-6} --compile --local-batch-size 1 --data.packing_row_len 8192"
  P1="--local-batch-size 1 --data.packing_row_len 16384 --ac none --compile"
  # Stage 2 at the FULL 7B depth: fp32 params + grads (~56 GB) fit one 80 GB GPU only without
  # AdamW's moments, so a state-free SGD stands in (AdamW's step added by estimate); AC full and
  # one micro-batch (FSDP2 keeps unsharded gradients between micro-batches: +14 GB).
  S2F="--stage 2 --grad-accum 1 --steps ${STEPS:-4} --compile --local-batch-size 1 --data.packing_row_len 8192 --sgd-standin"
  defer_probe 60
  run s1_best 90 $S1 $P1
  run s1_best_nodefer 75 $S1 $P1 --no-defer-check
  run s2_full_sgd_acfull 200 $S2F --ac full
  run s1_best_prof 75 --stage 1 --steps 2 $P1 --profile "$OUT/prof_s1"
  run s2_sacop 200 $S2 --ac selective
  run s2_noac 120 $S2 --ac none
  run s1_best_repl 75 $S1 $P1 --parallelism.replicate_frozen true
  run s2_full_sgd_sacop 120 $S2F --ac selective
  run s2_sacop_visiontower 100 $S2 --ac selective --parallelism.fsdp_vision_unit tower
  run s1_best_untrim 75 $S1 $P1 --no-trim-last-block
  run s1_best_fulllogits 75 $S1 $P1 --full-logits
  run s1_pack8k_syncs 45 --stage 1 --steps 3 --local-batch-size 1 --data.packing_row_len 8192 --sync-debug
  micro patch_embed 40 python benchmarks/patch_embed.py
  run s2_sacop_prof 100 $S2 --steps 2 --ac selective --profile "$OUT/prof_s2"
  ;;
round7)  # after round 6 (which ran out of time at stage 2 with selective AC: its cold compile took
  # > 110 s). defer_probe first (it now names the site of the one host sync round 6 saw in step
  # 1). Then stage 1 against the two kernels it loses most to, train-level first (what 2x
  # needs): the default, inductor's pointwise autotuning off (RoPE: ~57 ms of a step at ~0.5
  # TB/s, launched 512/8 where the block's other pointwise kernels ran 1024/4: see
  # rope_kernel.py's docstring). Then the kernel micro-benchmarks that explain them
  # (attention_kernel.py: torch's flash varlen against cuDNN's ragged attention, both checked
  # against fp32 SDPA; rope_kernel.py prints each variant's launch), coordinate-descent tuning,
  # and the profile. (Round 7 also ran the model's opt-in "cudnn" attention route, alone and with
  # autotuning off: its start-up check refused it both times, and the route was removed after
  # round 7, so those two runs are gone from this plan.) Then the
  # full-depth AC policies in one call (SGD stand-in; AC full also on the LLM's blocks alone,
  # the tower without AC), stage 2 at 8 layers selective vs no AC in one call, foreach vs fused
  # AdamW (the step check then reads before the update), the tower as one FSDP unit.
  S1="--stage 1 --steps ${STEPS:-6}"
  S2="--stage 2 --llm-layers 8 --grad-accum 2 --steps ${STEPS:-6} --compile --local-batch-size 1 --data.packing_row_len 8192"
  P1="--local-batch-size 1 --data.packing_row_len 16384 --ac none --compile --parallelism.replicate_frozen true"
  S2F="--stage 2 --grad-accum 1 --steps ${STEPS:-4} --compile --local-batch-size 1 --data.packing_row_len 8192 --sgd-standin"
  defer_probe 60
  run s1_repl 100 $S1 $P1
  run s1_repl_noautotune 100 $S1 $P1 --inductor triton.autotune_pointwise=False
  MICRO_TAIL=20 micro attention_kernel 90 python benchmarks/attention_kernel.py
  MICRO_TAIL=80 micro rope_kernel 200 python benchmarks/rope_kernel.py
  run s1_repl_cdt 150 $S1 $P1 --inductor coordinate_descent_tuning=True
  run s1_repl_prof 100 --stage 1 --steps 2 $P1 --profile "$OUT/prof_s1r"
  run s2_full_sgd_sacop 220 $S2F --ac selective
  run s2_full_sgd_acfull 150 $S2F --ac full
  run s2_full_sgd_acfull_llmonly 150 $S2F --ac full --activation_checkpoint.components llm
  run s2_sacop 200 $S2 --ac selective
  run s2_noac 120 $S2 --ac none
  run s2_sacop_foreach 120 $S2 --ac selective --optimizer.implementation foreach
  run s2_sacop_visiontower 150 $S2 --ac selective --parallelism.fsdp_vision_unit tower
  ;;
round8)  # after round 7, in order of priority for the 2x targets (a call rarely gets through all):
  # 1. where flash-attention 4 is installed (benchmarks/fa4_site.sh), its kernel check and stage 1
  #    with it; s1_repl is the same call's baseline;
  # 2. stage 2 at the full depth: selective AC "op" (the shipped policy, the baseline),
  #    "op_all_mm" (every matmul saved: round 7's no-AC gain at 8 layers was the LLM's recomputed
  #    matmuls; ~+8 GiB by activation_memory.py; ~-7% of the step by estimate), that with FA4
  #    (the best candidate), "op_all_mm" with the last 12 LLM blocks without AC (~+0.6 GiB each;
  #    no AC at all does not fit), then "op" with FA4 (FA4's own share in stage 2);
  # 3. stage 1 with the allocator's defaults against expandable segments (now run_train.sh's and
  #    the benchmark's default; round 7's trace had a 26.5 ms cudaFree stall at the step's peak),
  #    stage 1's profile (is the stall gone?), stage 2's full-depth kernel profile (its LLM blocks
  #    are FSDP units: whether their RoPE gets round 6's slow split launch is open);
  # 4. what round 7 left: at 8 layers "op" and "op_all_mm", the tower as one FSDP unit, "op" again
  #    (the vision bucket's spread was 78 ms in round 7); at the full depth "op" with the last 20
  #    LLM blocks without AC (~+0.84 GiB each), AC full on the LLM only;
  # 5. same-call before/afters of stage 1's compile and packing, and of fused vs foreach AdamW.
  # benchmarks/gpu_session.sh is the device-side wrapper (installs, runs, archives the logs).
  S1="--stage 1 --steps ${STEPS:-6}"
  S2="--stage 2 --llm-layers 8 --grad-accum 2 --steps ${STEPS:-6} --compile --local-batch-size 1 --data.packing_row_len 8192"
  P1="--local-batch-size 1 --data.packing_row_len 16384 --ac none --compile --parallelism.replicate_frozen true"
  S2F="--stage 2 --grad-accum 1 --steps ${STEPS:-4} --compile --local-batch-size 1 --data.packing_row_len 8192 --sgd-standin"
  MM="--ac selective --activation_checkpoint.selective_ac_option op_all_mm"
  FA4="--model.flash_attention_impl FA4"
  fa4=0  # flash-attention 4 importable (benchmarks/fa4_site.sh install)?
  if python -c "import flash_attn.cute.interface" >"$OUT/fa4_import.log" 2>&1; then
    fa4=1
    # Its kernels are compiled at first use in each process; the on-disk cache (off upstream by
    # default) lets the later FA4 runs load them (the compile keys do not depend on lengths).
    export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
    export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=${FA4_CACHE_DIR:-/tmp/fa4_cute_cache}
  else
    echo "flash-attention 4 not importable: FA4 runs skipped (benchmarks/fa4_site.sh):" | log
    tail -n 3 "$OUT/fa4_import.log" | log
  fi
  if (( fa4 )); then
    # flash-attention 4 for the LLM's attention, 19% of stage 1's step on torch's FA2-class
    # kernel: its parity and speed alone (the first call compiles its kernels), then stage 1.
    MICRO_TAIL=20 micro attention_fa4 150 python benchmarks/attention_kernel.py --flash-impl FA4
    run s1_repl_fa4 180 $S1 $P1 $FA4
    # FA4 failing in stage 1 (its compile, its start-up check) would fail the same way later.
    if [[ -f "$OUT/s1_repl_fa4.log" ]] && ! grep -q "^samples/s/GPU" "$OUT/s1_repl_fa4.log"; then
      echo "s1_repl_fa4 measured nothing: later FA4 runs skipped (see s1_repl_fa4.log)" | log
      fa4=0
    fi
  fi
  run s1_repl 100 $S1 $P1
  run s2_full_sgd_sacop 230 $S2F --ac selective
  run s2_full_sgd_sacmm 230 $S2F $MM
  (( fa4 )) && run s2_full_sgd_sacmm_fa4 250 $S2F $MM $FA4
  run s2_full_sgd_sacmm_noac12 230 $S2F $MM --activation_checkpoint.llm_layers_without_ac 12
  (( fa4 )) && run s2_full_sgd_sacop_fa4 250 $S2F --ac selective $FA4
  RUN_ENV="PYTORCH_CUDA_ALLOC_CONF=" run s1_alloc_default 100 $S1 $P1
  run s1_repl_prof 100 --stage 1 --steps 2 $P1 --profile "$OUT/prof_s1r"
  run s2_full_sgd_sacop_prof 200 --stage 2 --grad-accum 1 --steps 2 --compile --local-batch-size 1 --data.packing_row_len 8192 --sgd-standin --ac selective --profile "$OUT/prof_s2f"
  run s2_sacop 200 $S2 --ac selective
  run s2_sacmm 150 $S2 $MM
  run s2_sacop_visiontower 150 $S2 --ac selective --parallelism.fsdp_vision_unit tower
  run s2_sacop_again 120 $S2 --ac selective
  run s2_full_sgd_sacop_noac20 230 $S2F --ac selective --activation_checkpoint.llm_layers_without_ac 20
  run s2_full_sgd_acfull_llmonly 150 $S2F --ac full --activation_checkpoint.components llm
  # 5. same-call before/afters the issue asks for and earlier rounds ran across calls: stage 1's
  #    shipped config without compile (at 8192-token rows: eager at 16384 would need ~78 GiB),
  #    without packing (4 rows padded to the longest), and stage 2's foreach AdamW beside fused
  #    (s2_sacop and s2_sacop_again: the vision bucket's spread).
  P1_8K="--local-batch-size 1 --data.packing_row_len 8192 --ac none --parallelism.replicate_frozen true"
  run s1_8k 100 $S1 $P1_8K --compile
  run s1_8k_eager 120 $S1 $P1_8K
  run s1_repl_nopack 120 --stage 1 --steps ${STEPS:-6} --local-batch-size 4 --no-packing --ac none --compile --parallelism.replicate_frozen true
  run s2_sacop_foreach 150 $S2 --ac selective --optimizer.implementation foreach
  ;;
round9)  # after round 8 (flash-attention 4 shipped as "auto"; op_all_mm slower at the full depth), in
  # order of priority; every run asks for "auto" (FA4 where .fa4 is installed, else torch's kernel):
  # 1. the profiles of the shipped configs with FA4: stage 1 (what is left once attention shrank),
  #    stage 2 at the full depth (its LLM blocks are FSDP units: do they get round 6's slow RoPE?);
  # 2. same-call before/afters still measured only across calls: stage 1's compile (at 8192-token
  #    rows: eager at 16384 needs ~78 GiB) and fused vs foreach AdamW (stage 2, 8 layers);
  # 3. stage 2 at the full depth with the last 20 LLM blocks without AC (~+0.84 GiB each over "op").
  AUTO="--model.flash_attention_impl auto"
  if python -c "import flash_attn.cute.interface" >"$OUT/fa4_import.log" 2>&1; then
    export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1  # one FA4 compile serves every process
    export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=${FA4_CACHE_DIR:-/tmp/fa4_cute_cache}
  else
    echo "flash-attention 4 not importable: \"auto\" runs torch's kernel (benchmarks/fa4_site.sh):" | log
    tail -n 3 "$OUT/fa4_import.log" | log
  fi
  P1="--local-batch-size 1 --data.packing_row_len 16384 --ac none --compile --parallelism.replicate_frozen true $AUTO"
  S2F="--stage 2 --grad-accum 1 --steps ${STEPS:-4} --compile --local-batch-size 1 --data.packing_row_len 8192 --sgd-standin $AUTO"
  S2="--stage 2 --llm-layers 8 --grad-accum 2 --steps ${STEPS:-6} --compile --local-batch-size 1 --data.packing_row_len 8192 $AUTO"
  run s1_auto 150 --stage 1 --steps ${STEPS:-6} $P1
  run s1_auto_prof 100 --stage 1 --steps 2 $P1 --profile "$OUT/prof_s1a"
  run s2_full_sgd_sacop_auto_prof 200 $S2F --steps 2 --ac selective --profile "$OUT/prof_s2fa"
  P1_8K="--local-batch-size 1 --data.packing_row_len 8192 --ac none --parallelism.replicate_frozen true $AUTO"
  run s1_8k_auto 100 --stage 1 --steps ${STEPS:-6} $P1_8K --compile
  run s1_8k_auto_eager 120 --stage 1 --steps ${STEPS:-6} $P1_8K
  run s2_sacop_auto 150 $S2 --ac selective
  run s2_sacop_auto_foreach 150 $S2 --ac selective --optimizer.implementation foreach
  run s2_full_sgd_sacop_auto 230 $S2F --ac selective
  run s2_full_sgd_sacop_auto_noac20 230 $S2F --ac selective --activation_checkpoint.llm_layers_without_ac 20
  ;;
probe)  # only the deferred-step-check probe (seconds)
  defer_probe 60
  ;;
round7h200)  # one H200 (kind nvidia-h200): stage 2 at the FULL depth with the real AdamW (fp32
  # master weights, gradients and moments ~105 GiB; round 6's AC-full run with the SGD stand-in
  # peaked at 53.5 GiB), AC full against selective in one call: the shipped stage-2 policy at the
  # real depth with no estimate. Then the SGD stand-in without AC (~90 GiB by round 6's figures):
  # the per-GPU work of the 8-GPU config with no AC (there the sharded fp32 state is ~14 GB).
  # Same flags as round 6's s2_full_sgd_acfull otherwise; H200 figures are not compared with H100's.
  # The limits add up to more than one call: BUDGET_S=520 runs the first AdamW pair, then
  # ONLY="s2_full_adamw_sacmm s2_full_sgd_noac s2_full_sgd_acfull" on the warm machine.
  S2F="--stage 2 --grad-accum 1 --steps ${STEPS:-4} --compile --local-batch-size 1 --data.packing_row_len 8192"
  run s2_full_adamw_acfull 200 $S2F --ac full
  run s2_full_adamw_sacop 240 $S2F --ac selective
  # "op_all_mm" (session 10; ~+8 GiB over "op" by activation_memory.py): with AdamW's real step.
  run s2_full_adamw_sacmm 240 $S2F --ac selective --activation_checkpoint.selective_ac_option op_all_mm
  run s2_full_sgd_noac 200 $S2F --sgd-standin --ac none
  run s2_full_sgd_acfull 150 $S2F --sgd-standin --ac full
  ;;
round3h200)  # stage 2 at FULL depth on one H200 (fp32 master + AdamW ~108 GB; AC full, compiled)
  S2="--stage 2 --grad-accum 2 --steps ${STEPS:-4} --compile"
  run s2_full_pack8k 240 $S2 --local-batch-size 1 --data.packing_row_len 8192
  run s2_full_nopack 240 $S2 --local-batch-size 2 --no-packing
  ;;
round3s2)  # stage 2 at 8 layers, compiled: packed 1 x 8192 vs unpacked 2 rows
  S2="--stage 2 --llm-layers 8 --grad-accum 2 --steps ${STEPS:-6} --compile"
  run s2_nopack 120 $S2 --local-batch-size 2 --no-packing
  run s2_pack8k 120 $S2 --local-batch-size 1 --data.packing_row_len 8192
  ;;
esac
