"""Training throughput of the real Trainer (the code path of run_train.sh) on synthetic LLaVA data:
samples/s/GPU, text and image tokens/s/GPU, MFU, a step-time breakdown and peak memory, vs the
reference's per-GPU rate. Run: python benchmarks/train_throughput.py --stage 1 [--help]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, replace

# The allocator settings run_train.sh exports (this is its code path); set either variable, even
# to "" (the allocator's defaults), to measure others. Read at the first CUDA allocation.
if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runnable as a plain script from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernel_profile import StepProfiler, install_phase_markers, phase_marker
from throughput_report import NewShapes, depth_scaled_rate, report
from step_marks import StepMarks, install_probes
from synthetic_data import TOKENIZER_PATH, write_dataset

from titan_llava.config import load_config
from titan_llava.distributed.utils import destroy_distributed
from titan_llava.flops import peak_flops
from titan_llava.loss import cross_entropy_sum
from titan_llava.metrics import alloc_conf
from titan_llava.metrics import step_counts as step_counts_of
from titan_llava.models import attention, fa4_compat
from titan_llava.models.args import LLAVA_FLAVORS
from titan_llava.optim import build_lr_scheduler
from titan_llava.step_check import is_sync_warning
from titan_llava.trainer import Trainer

# The reference recipe on 8x H100 80G (REFERENCE.md): 558K samples in ~4 h, 665K in ~11.5 h.
REFERENCE_SAMPLES_PER_S_PER_GPU = {1: 4.8, 2: 2.0}
BUCKETS = ("data_wait", "vision", "llm", "bwd_tail", "grad_norm_clip", "optimizer", "host_other")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", type=int, choices=(1, 2), default=1)
    p.add_argument("--flavor", default="llava-next-vicuna-7b")
    p.add_argument(
        "--llm-layers",
        type=int,
        default=None,
        help="reduced LLM depth (the real width); default: the flavor's depth",
    )
    p.add_argument("--steps", type=int, default=10, help="measured steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="steps excluded from the figures")
    p.add_argument("--local-batch-size", type=int, default=None, help="rows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ac", choices=("none", "full", "selective"), default="full")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument(
        "--torch-varlen",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-torch-varlen: packed rows on CUDA use sdpa's dense mask (the pre-varlen baseline)",
    )
    p.add_argument(
        "--trim-last-block",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-trim-last-block: the last LLM block runs on every position, its output indexed "
        "afterwards (the behaviour before the trim; MFU then undercounts what runs)",
    )
    p.add_argument(
        "--full-logits",
        action="store_true",
        help="the before of 'logits only at loss positions': the head and the fp32 cross-entropy "
        "run on every position (full [rows, seq, vocab] logits, the last block untrimmed); MFU "
        "then undercounts what runs, compare by samples/s",
    )
    p.add_argument(
        "--inductor",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="set a torch._inductor.config option for the whole run, e.g. "
        "triton.autotune_pointwise=False or coordinate_descent_tuning=True (VALUE a Python "
        "literal; repeatable): an A/B of how the compiled blocks are tuned",
    )
    p.add_argument(
        "--sgd-standin",
        action="store_true",
        help="replace AdamW by a state-free foreach SGD (same parameter groups and learning rates), "
        "so that stage 2 at the FULL 7B depth fits one 80 GB GPU (fp32 parameters + gradients "
        "~56 GB; AdamW's moments would add 56 GB more). The forward/backward is the real one; "
        "the report adds AdamW's step estimated from SGD's by memory traffic",
    )
    p.add_argument(
        "--defer-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-defer-check: read each step's loss and gradient norm on the host before its "
        "update (one host sync per step: the behaviour before the deferred check)",
    )
    p.add_argument(
        "--sync-debug",
        action="store_true",
        help="CUDA: count the host syncs of the measured steps and where they happen "
        "(torch.cuda.set_sync_debug_mode; slows those steps, so timings of this run are not figures)",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="profile the measured steps (torch.profiler): print device time per kernel category "
        "and the top kernels, write DIR/kernel_profile.json and DIR/trace.json.gz (adds some "
        "overhead to the figures of this run)",
    )
    p.add_argument("--num-workers", type=int, default=None, help="default: 4 on CUDA, 0 on CPU")
    p.add_argument("--samples", type=int, default=None, help="synthetic samples to write")
    p.add_argument("--data-dir", default=None, help="default: a temporary directory")
    p.add_argument("--json-out", default=None, help="also write the figures to this JSON file")
    # Anything after the known flags is passed to the trainer config (--section.key value).
    return p.parse_known_args(argv)


def build_trainer(
    a: argparse.Namespace,
    overrides: list[str],
    data_path: str,
    image_folder: str,
    dump: str,
    cuda: bool,
) -> Trainer:
    flavor = a.flavor
    if a.llm_layers is not None:
        base = LLAVA_FLAVORS[a.flavor]
        flavor = f"{a.flavor}-llm{a.llm_layers}L"
        # A derived flavor: the same classes and code path, only a shallower LLM.
        LLAVA_FLAVORS[flavor] = replace(base, llm=replace(base.llm, n_layers=a.llm_layers))
    lbs = a.local_batch_size or (2 if a.stage == 1 else 1)
    workers = a.num_workers if a.num_workers is not None else (4 if cuda else 0)
    stage = {
        1: [
            "--data.template",
            "plain",
            "--training.trainable",
            '["projector"]',
            "--optimizer.lr",
            "1e-3",
            "--data.group_by_modality_length",
            "false",
        ],
        2: [
            "--data.template",
            "vicuna_v1",
            "--training.trainable",
            '["projector","llm","vision"]',
            "--optimizer.lr",
            "2e-5",
            "--optimizer.vision_lr",
            "2e-6",
            "--data.group_by_modality_length",
            "true",
            *(["--data.modality_megabatch", "128"] if a.packing else []),
        ],
    }[a.stage]
    argv = [
        "--job.dump_folder",
        dump,
        "--model.flavor",
        flavor,
        "--model.tokenizer_path",
        TOKENIZER_PATH,
        "--data.path",
        data_path,
        "--data.image_folder",
        image_folder,
        "--data.packing",
        str(a.packing).lower(),
        "--data.max_seq_len",
        str(a.seq_len),
        "--data.num_workers",
        str(workers),
        "--training.steps",
        str(a.warmup + a.steps),
        "--training.local_batch_size",
        str(lbs),
        "--training.global_batch_size",
        str(lbs * a.grad_accum),
        "--activation_checkpoint.mode",
        a.ac,
        "--compile.enable",
        str(a.compile).lower(),
        "--metrics.log_freq",
        str(a.warmup + a.steps),
        "--lr_scheduler.warmup_steps",
        "1",
        "--training.mixed_precision_param",
        "bfloat16" if cuda else "float32",
        *stage,
        *overrides,
    ]
    print("trainer config overrides: " + " ".join(argv), flush=True)
    return Trainer(load_config(argv))


def run(a: argparse.Namespace, overrides: list[str], folder: str) -> dict:
    cuda = torch.cuda.is_available()
    if not a.torch_varlen:
        attention.torch_varlen_usable = lambda *args, **kwargs: False
    n_samples = a.samples or max(200, 12 * (a.warmup + a.steps) * a.grad_accum * 4)
    t0 = time.perf_counter()
    data_path, stats = write_dataset(os.path.join(folder, "data"), a.stage, n_samples)
    print(f"synthetic data: {n_samples} samples in {time.perf_counter() - t0:.1f}s", flush=True)
    trainer = build_trainer(
        a, overrides, data_path, os.path.join(folder, "data"), os.path.join(folder, "dump"), cuda
    )
    device = trainer.device
    full_args = LLAVA_FLAVORS[a.flavor]
    if not a.trim_last_block:
        untrim_last_block(trainer.model.language_model)
    if not a.defer_check:
        trainer.step_check.defer = False
    if a.full_logits:
        full_logits_loss(trainer)
    if a.sgd_standin:
        sgd_standin(trainer)
    marks = StepMarks(device)
    install_probes(trainer, marks)
    counts: list[dict[str, float]] = []
    waits: list[float] = []
    full_flops: list[float] = []
    shapes = NewShapes()  # the vision tower's batch: a micro-batch's tiles
    clock: dict[str, float] = {}
    records: list[dict] = []
    profiler = StepProfiler(a.profile, cuda) if a.profile else None
    if profiler is not None:
        install_phase_markers(trainer.model, trainer.optimizer)
    kernels = None

    orig_next, orig_step = trainer._next_microbatches, trainer.train_step
    orig_counts, orig_log = trainer._step_counts, trainer.metrics.log

    def next_microbatches():
        if profiler is not None:
            phase_marker("data")  # the next batch: its wait, transfer and the step check's read
        if trainer.step == a.warmup + 1:
            if cuda:
                torch.cuda.synchronize()  # between steps: the window starts on an idle device
            marks.active, clock["start"] = True, time.perf_counter()
            clock["fa4_calls"] = dict(fa4_compat.calls)
            if cuda:
                clock["retries"] = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
            if cuda and a.sync_debug:
                torch.cuda.set_sync_debug_mode("warn")
            if profiler is not None:
                profiler.start()
        mbs, wait = orig_next()
        if marks.active:
            waits.append(wait)
        return mbs, wait

    def train_step(mbs, record):
        if profiler is not None:
            phase_marker("step start")
        marks.begin_step()
        marks.mark("start")
        out = orig_step(mbs, record)
        marks.mark("end")
        return out

    def step_counts(mbs):
        c = orig_counts(mbs)
        shapes.add_step(
            [0 if mb.pixel_values is None else mb.pixel_values.shape[0] for mb in mbs],
            marks.active,
        )
        if marks.active:
            counts.append({**c, "row_slots": sum(mb.input_ids.numel() for mb in mbs)})
            # The same batches' model FLOPs at the flavor's full LLM depth.
            full = step_counts_of(
                mbs, trainer.tokenizer.pad_id, full_args, trainer.cfg.training.trainable
            )
            full_flops.append(full["flops"])
        return c

    def log(step, **kw):
        rec = orig_log(step, **kw)
        records.append(rec)
        return rec

    trainer._next_microbatches, trainer.train_step = next_microbatches, train_step
    trainer._step_counts, trainer.metrics.log = step_counts, log
    try:
        sync_debug = cuda and a.sync_debug
        sites: Counter = Counter()
        # With --sync-debug each sync warning is attributed, at the moment it is raised, to the
        # innermost frame of this repository (and the library line that synchronised).
        with warnings.catch_warnings() if sync_debug else contextlib.nullcontext():
            if sync_debug:
                warnings.simplefilter("always")
                warnings.showwarning = lambda message, *rest, **kw: (
                    sites.update([_sync_site()]) if is_sync_warning(message) else None
                )
            trainer.train()
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
        if "start" not in clock or len(counts) != a.steps:
            # The trainer returned early: SIGTERM (a time limit: it saves a checkpoint and
            # returns) or a stop flag. Too few measured steps for a figure.
            raise SystemExit(f"error: only {len(counts)} of the {a.steps} measured steps ran "
                             f"(SIGTERM / time limit during warm-up or compile?); no figures")
        elapsed = time.perf_counter() - clock["start"]
        retries = (torch.cuda.memory_stats(device).get("num_alloc_retries", 0) - clock["retries"]
                   if cuda else None)
        if profiler is not None:
            kernels = profiler.stop(a.steps, elapsed)
        if sync_debug:
            print(f"host syncs in the {a.steps} measured steps: {sum(sites.values())} "
                  f"(incl. the last step's metrics log)")
            for site, k in sites.most_common():
                print(f"  {k:4d}  {site}")
    finally:
        trainer.close()
        trainer.data_loader.close()
        destroy_distributed()

    n = len(counts)
    tot = {k: sum(c[k] for c in counts) for k in counts[0]}
    step_s = elapsed / n
    peak = peak_flops(device)
    bd = marks.breakdown_ms()
    bd["data_wait"] = 1e3 * sum(waits) / n
    # Device-time buckets (CUDA events) plus host-time data wait: on CUDA the host fetches the next
    # batch while the device still runs the queued step, so the data wait can overlap the device
    # buckets. The overlap is reported, not hidden by clamping host_other at 0.
    rest = 1e3 * step_s - sum(bd.values())
    bd["host_other"] = max(0.0, rest)
    overlap_ms = max(0.0, -rest)
    ref = REFERENCE_SAMPLES_PER_S_PER_GPU[a.stage]
    sps = tot["samples"] / elapsed
    m = trainer.model_args
    res = {
        "stage": a.stage,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "flavor": trainer.cfg.model.flavor,
        "llm_layers": m.llm.n_layers,
        "llm_layers_full": full_args.llm.n_layers,
        "vision_layers_built": m.vision.n_built_layers,
        "trainable": trainer.cfg.training.trainable,
        "local_batch_size": trainer.cfg.training.local_batch_size,
        "grad_accum": trainer.grad_accum,
        "seq_len": a.seq_len,
        "packing": a.packing,
        "row_len": trainer.cfg.packing_row_len() if a.packing else a.seq_len,
        "ac": a.ac,
        "ac_option": trainer.cfg.activation_checkpoint.selective_ac_option,
        "ac_components": trainer.cfg.activation_checkpoint.components,
        "ac_without": {
            "llm": trainer.cfg.activation_checkpoint.llm_layers_without_ac,
            "vision": trainer.cfg.activation_checkpoint.vision_layers_without_ac,
        },
        "compile": a.compile,
        "trim_last_block": a.trim_last_block and not a.full_logits,
        "full_logits": a.full_logits,
        "inductor_options": inductor_options(a.inductor),
        # Whether the step's numbers were read a step later (fused AdamW) or before each update.
        "deferred_check": trainer.step_check.defer,
        "attn_backend": trainer.cfg.model.attn_backend,
        "flash_attention_impl": trainer.flash_attention_impl,
        # Calls of the flash-attention 4 kernels in the measured steps (proof they ran there).
        "fa4_calls_measured": {k: v - clock["fa4_calls"][k] for k, v in fa4_compat.calls.items()},
        # What the LLM's packed rows ran on (activations are bf16 on CUDA, fp32 on CPU).
        "torch_varlen": a.packing
        and trainer.cfg.model.attn_backend == "sdpa"
        and attention.torch_varlen_usable(device, torch.bfloat16 if cuda else torch.float32),
        "num_workers": trainer.cfg.data.num_workers,
        "synthetic": asdict(stats),
        "warmup_steps": a.warmup,
        "measured_steps": n,
        "step_time_s": step_s,
        "samples_per_s": sps,
        "text_tokens_per_s": tot["text_tokens"] / elapsed,
        "image_tokens_per_s": tot["image_tokens"] / elapsed,
        "tokens_per_s": tot["tokens"] / elapsed,
        "padding_fraction": 1 - tot["tokens"] / tot["row_slots"],
        "tflop_per_sample": tot["flops"] / tot["samples"] / 1e12,
        "tflops_per_s": tot["flops"] / elapsed / 1e12,
        "mfu": tot["flops"] / elapsed / peak if peak else None,
        "peak_flops": peak,
        "breakdown_ms": {k: bd.get(k, 0.0) for k in BUCKETS},
        "breakdown_overlap_ms": overlap_ms,
        "peak_memory_gib": records[-1]["memory_gib"] if records else None,
        # The caching allocator: its settings, and the allocations it served only after freeing
        # its cache (each a device-wide stall) in the measured steps.
        "alloc_conf": alloc_conf(),
        "alloc_retries": retries,
        # Measured micro-batches with images, and how many had a tile count (the tower's batch)
        # that no earlier step had.
        "vision_micro_batches": shapes.measured,
        "vision_new_tile_counts": shapes.new,
        # Per measured step: the vision bucket and whether a micro-batch had a new tile count.
        "vision_ms_per_step": [st.get("vision", 0.0) for st in marks.per_step_ms()],
        "vision_new_per_step": shapes.new_per_step,
        "reference_samples_per_s": ref,
        "ratio_to_reference": sps / ref,
        "full_depth_estimate_samples_per_s": (
            tot["flops"] / sum(full_flops) * sps
            if m.llm.n_layers != full_args.llm.n_layers
            else None
        ),
        "full_depth_estimate_by_time_samples_per_s": (
            depth_scaled_rate(sps, step_s, bd, full_args.llm.n_layers / m.llm.n_layers)
            if m.llm.n_layers != full_args.llm.n_layers
            else None
        ),
        "optimizer": "SGD stand-in (foreach, no state)" if a.sgd_standin else "AdamW",
        # SGD stand-in: the rate with the optimizer bucket scaled to AdamW's memory traffic.
        "adamw_estimate_samples_per_s": (
            tot["samples"]
            / (elapsed + n * bd["optimizer"] * (ADAMW_OVER_SGD_TRAFFIC - 1) / 1e3)
            if a.sgd_standin
            else None
        ),
        "final_loss": records[-1]["loss"] if records else None,
        "profiled": profiler is not None,
        "kernel_profile": kernels.to_json(top_n=20) if kernels is not None else None,
    }
    if kernels is not None:
        print(kernels.report(), flush=True)
    return res


def untrim_last_block(llm: torch.nn.Module) -> None:
    """Make the LLM's last block run on every position and index its output afterwards (the
    before of the last-block trim), around whatever forward it has (compiled, checkpointed)."""
    last = list(llm.layers.values())[-1]
    inner = last.forward

    def full_last_block(h, cos, sin, mask, output_index=None):
        out = inner(h, cos, sin, mask)
        return out if output_index is None else out.flatten(0, 1).index_select(0, output_index)

    last.forward = full_last_block


# Fused AdamW reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq (7 fp32
# values per parameter); SGD without momentum reads param and grad and writes param (3). Both are
# bound by memory bandwidth, so AdamW's step takes about 7/3 of SGD's.
ADAMW_OVER_SGD_TRAFFIC = 7 / 3


class _StandinSGD(torch.optim.SGD):
    """foreach SGD (fused SGD has no DTensor sharding rule) that ignores the trainer's `found_inf`:
    a timing stand-in, it does not skip non-finite steps."""

    def step(self, closure=None):
        self.__dict__.pop("found_inf", None)
        return super().step(closure)


def sgd_standin(trainer: Trainer) -> None:
    """Replace the trainer's AdamW, before its first step (so it never allocates its moments), by
    SGD without momentum or weight decay (no state) over the same parameter groups and learning
    rates, with a new LR schedule driving it (the old one would keep scheduling the AdamW). The
    trainer's step check stays as it was (deferred with fused AdamW on CUDA). Benchmark runs save
    no checkpoint: the checkpointer still holds the AdamW."""
    if trainer.cfg.checkpoint.enable:
        raise ValueError("--sgd-standin is for runs without checkpoints (checkpoint.enable false)")
    groups = [  # base rates: the scheduler has already scaled "lr" by its first factor
        {"params": g["params"], "lr": g.get("initial_lr", g["lr"]), "name": g.get("name")}
        for g in trainer.optimizer.param_groups
    ]
    trainer.optimizer = _StandinSGD(
        groups, lr=groups[0]["lr"], momentum=0.0, weight_decay=0.0, foreach=True
    )
    trainer.lr_scheduler = build_lr_scheduler(trainer.optimizer, trainer.cfg, trainer.total_steps)
    trainer.step_check.optimizer = trainer.optimizer  # arms (and drops) found_inf on it


def full_logits_loss(trainer: Trainer) -> None:
    """Make the trainer's loss compute logits on every position and the fp32 cross-entropy over
    all of them (the before of computing them at loss positions only); same loss value."""
    trainer.forward_loss_sum = lambda mb: cross_entropy_sum(
        trainer.logits(mb, None), mb.labels, mb.document_ids
    )


def _sync_site() -> str:
    """'repo_file:line <- library_file:line' of the current stack (called from showwarning)."""
    stack = traceback.extract_stack()[:-2]  # drop this function and the showwarning lambda
    inner = next(
        (f for f in reversed(stack) if "warnings.py" not in f.filename), stack[-1]
    )
    repo = next(
        (f for f in reversed(stack) if f.filename.startswith(REPO) and "site-packages" not in f.filename), None
    )

    def where(f: traceback.FrameSummary) -> str:
        name = os.path.relpath(f.filename, REPO) if f.filename.startswith(REPO) else f.filename
        return f"{name.split('site-packages/')[-1]}:{f.lineno}"

    if repo is None or repo is inner:
        return where(inner)
    return f"{where(repo)} <- {where(inner)}"


def inductor_options(pairs: list[str]) -> dict[str, object]:
    """--inductor KEY=VALUE pairs as a dict for torch._inductor.config.patch; VALUE is a Python
    literal of the option's type (an int where a float is expected is fine)."""
    known = torch._inductor.config.get_config_copy()
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--inductor takes KEY=VALUE, got {pair!r}")
        if key not in known:
            raise ValueError(f"--inductor: torch._inductor.config has no option {key!r}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"--inductor {key}: {value!r} is not a Python literal") from e
        default = known[key]
        expected = float if isinstance(default, float) else type(default)
        ok = (
            default is None
            or (isinstance(parsed, bool) if isinstance(default, bool) else isinstance(parsed, expected))
            or (expected is float and isinstance(parsed, int) and not isinstance(parsed, bool))
        )
        if not ok:
            raise ValueError(
                f"--inductor {key}: expected a {type(default).__name__} (default {default!r}), "
                f"got {parsed!r}"
            )
        options[key] = parsed
    return options


def main(argv: list[str] | None = None) -> int:
    a, overrides = parse_args(argv)
    if a.steps < 1 or a.warmup < 1:
        raise ValueError("--steps and --warmup must be >= 1")
    options = inductor_options(a.inductor)
    with tempfile.TemporaryDirectory(prefix="titan_llava_bench_") as tmp, \
            torch._inductor.config.patch(options):
        folder = a.data_dir or tmp
        r = run(a, overrides, folder)
    print(report(r), flush=True)
    print("RESULT " + json.dumps(r), flush=True)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
