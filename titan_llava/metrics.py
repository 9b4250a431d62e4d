"""Step metrics: `<dump_folder>/metrics.jsonl` (one JSON object per logged step), a human progress
line with ETA on stdout, and optional TensorBoard / W&B (only when installed and enabled).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Sequence, TextIO

import torch

from titan_llava.flops import document_lengths, peak_flops, step_flops
from titan_llava.models.args import LlavaNextArgs
from titan_llava.step_records import drop_records_after

logger = logging.getLogger(__name__)


def alloc_conf() -> str | None:
    """The CUDA caching allocator's settings from the environment (None: not set)."""
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        if name in os.environ:
            return f"{name}={os.environ[name]!r}"
    return None


class DeviceMemory:
    """The CUDA caching allocator, per log interval: peak allocated memory (GiB) and how many
    allocations it could only serve after freeing its cache and retrying. A retry releases cached
    blocks with cudaFree, which waits for the whole device: a stall the step cannot hide (round 7's
    stage-1 trace, benchmarks/README.md). Retries mean memory is near full or fragmented.
    `interval()` returns (None, None) off CUDA."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._retries = self._total_retries()
        self.warned = False
        if self.device.type == "cuda":
            logger.info("CUDA caching allocator: %s", alloc_conf() or "default settings")

    def _total_retries(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0))

    def interval(self) -> tuple[float | None, int | None]:
        """(peak GiB, retries) since the last call (or construction); resets the peak."""
        if self.device.type != "cuda":
            return None, None
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        total = self._total_retries()
        retries, self._retries = total - self._retries, total
        if retries and not self.warned:
            self.warned = True
            logger.warning(
                "the CUDA caching allocator freed its cache and retried %d allocation(s) since the "
                "last log (each retry stalls the device; peak %.1f GiB): memory is near full or "
                "fragmented (%s). 'expandable_segments:True' (run_train.sh's "
                "default) is meant to avoid those fragmentation causes; less memory per step "
                "(activation checkpointing, shorter rows) the others. Warned once; the metrics "
                "keep counting (alloc_retries).",
                retries, peak, alloc_conf() or "allocator settings not set",
            )
        return peak, retries


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def step_counts(
    microbatches: list, pad_id: int, model_args: LlavaNextArgs, trainable: Sequence[str]
) -> dict[str, float]:
    """Per-rank token / sample / model-FLOP counts of one step from the host copies of its
    micro-batches (titan_llava.data.batch.Batch), so counting never waits on the device.

    Model FLOPs are counted per micro-batch: whether a frozen LLM backpropagates depends on
    whether that micro-batch has images (a text-only one's stand-in tile, which keeps a sharded
    tower's collectives in step, is overhead, not model work). So the count of a step does not
    depend on how its samples fall to ranks, beyond which samples share a micro-batch."""
    tokens = image_tokens = samples = 0
    flops = 0.0
    for mb in microbatches:
        lengths = document_lengths(mb.input_ids, pad_id, mb.document_ids)
        tiles = 0 if mb.pixel_values is None else int(mb.pixel_values.shape[0])
        tokens += sum(lengths)
        image_tokens += mb.num_image_positions
        samples += sum(len(ids) for ids in mb.sample_ids)
        head_tokens = int(mb.loss_index.shape[0])
        flops += step_flops(model_args, lengths, tiles, trainable, head_tokens=head_tokens).total
    return {
        "tokens": tokens,
        "image_tokens": image_tokens,
        "text_tokens": tokens - image_tokens,
        "samples": samples,
        "flops": flops,
    }


class StepWindow:
    """Per-rank sums of the step counts (and data wait) since the last log line, the number of
    steps and the wall time since then."""

    KEYS = ("tokens", "image_tokens", "text_tokens", "samples", "flops", "data_wait_s")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, counts: dict[str, float], data_wait_s: float) -> None:
        for k, v in counts.items():
            self.sums[k] += v
        self.sums["data_wait_s"] += data_wait_s
        self.steps += 1

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0


class MetricsLogger:
    """Writes one record per logged step. Only the rank with rank == 0 writes anything.

    All counts passed to `log` are totals over ALL ranks since the previous `log` call (the caller
    all-reduces them); `interval_s` is the wall time of that interval."""

    @classmethod
    def for_run(
        cls, cfg: Any, total_steps: int, rank: int, world_size: int, device: torch.device
    ) -> MetricsLogger:
        """The logger a training run's config asks for (its dump folder, [metrics] backends)."""
        m = cfg.metrics
        return cls(
            cfg.job.dump_folder, total_steps, rank=rank, world_size=world_size,
            peak_flops_per_device=peak_flops(device), enable_tensorboard=m.enable_tensorboard,
            tb_folder=m.save_tb_folder, enable_wandb=m.enable_wandb, config=cfg.to_dict(),
        )

    def __init__(
        self,
        dump_folder: str,
        total_steps: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        peak_flops_per_device: float | None = None,
        enable_tensorboard: bool = False,
        tb_folder: str = "tb",
        enable_wandb: bool = False,
        config: dict | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.total_steps = total_steps
        self.rank = rank
        self.world_size = world_size
        self.peak = peak_flops_per_device
        self.stream = sys.stdout if stream is None else stream
        self.last_step: int | None = None
        self._file = None
        self._tb = None
        self._wandb = None
        if rank != 0:
            return
        os.makedirs(dump_folder, exist_ok=True)
        # Append: a resumed run continues the same file (records carry their step).
        self.path = os.path.join(dump_folder, "metrics.jsonl")
        self._file = open(self.path, "a")
        if enable_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("metrics.enable_tensorboard: tensorboard is not installed; skipping")
            else:
                self._tb = SummaryWriter(os.path.join(dump_folder, tb_folder))
        if enable_wandb:
            try:
                import wandb
            except ImportError:
                logger.warning("metrics.enable_wandb: wandb is not installed; skipping")
            else:
                # One W&B run per dump folder: every restart (preemption, crash) continues it
                # instead of starting a new run.
                self._wandb = wandb.init(
                    project="titan_llava", dir=dump_folder, config=config,
                    id=_wandb_run_id(dump_folder), resume="allow",
                )

    def resume(self, step: int) -> None:
        """Move the records of steps after `step` (the checkpoint being resumed) out of
        metrics.jsonl into metrics.superseded.jsonl: a crash after them replays those steps (and a
        load_step branch abandons them), and each would otherwise appear twice. Rewritten
        atomically; a torn last line (the crash itself) is dropped."""
        if self._file is None:
            return
        self._file.close()
        dropped = drop_records_after(self.path, step)
        if dropped:
            with open(os.path.join(os.path.dirname(self.path), "metrics.superseded.jsonl"), "a") as fh:
                fh.writelines(dropped)
        self._file = open(self.path, "a")

    def log(
        self,
        step: int,
        *,
        loss: float,
        grad_norm: float,
        lr: float,
        interval_s: float,
        steps_in_interval: int,
        tokens: int,
        text_tokens: int,
        image_tokens: int,
        samples: int,
        flops: float,
        data_wait_s: float,
        skipped: dict[str, int] | None = None,
        data_events: dict[str, int] | None = None,
        memory_gib: float | None = None,
        alloc_retries: int | None = None,
        epoch: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Build the record, write it (rank 0) and return it. `tokens` counts real (non-padding)
        tokens incl. image tokens; `flops` is the step_flops total over all ranks."""
        dt = max(interval_s, 1e-9)
        mfu = None
        if self.peak:
            mfu = flops / (dt * self.peak * self.world_size)
        step_s = dt / max(steps_in_interval, 1)
        record: dict[str, Any] = {
            "step": step,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_sec": tokens / dt,
            "tokens_per_sec_per_device": tokens / dt / self.world_size,
            "text_tokens_per_sec": text_tokens / dt,
            "image_tokens_per_sec": image_tokens / dt,
            "samples_per_sec": samples / dt,
            "tflops_per_device": flops / dt / self.world_size / 1e12,
            "mfu": mfu,
            "memory_gib": memory_gib,
            "alloc_retries": alloc_retries,
            "data_wait_s": data_wait_s,
            "step_time_s": step_s,
            "skipped": dict(skipped or {}),
            "data_events": dict(data_events or {}),
            "eta_s": max(self.total_steps - step, 0) * step_s,
        }
        if epoch is not None:
            record["epoch"] = epoch
        if extra:
            record.update(extra)
        self.last_step = step
        if self.rank != 0:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.stream.write(self.progress_line(record) + "\n")
        self.stream.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        scalars.update({f"skipped/{k}": v for k, v in record["skipped"].items()})
        scalars.update({f"data/{k}": v for k, v in record["data_events"].items()})
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        return record

    def progress_line(self, r: dict[str, Any]) -> str:
        parts = [
            f"step {r['step']}/{self.total_steps}",
            f"loss {r['loss']:.4f}",
            f"grad_norm {r['grad_norm']:.3f}",
            f"lr {r['lr']:.2e}",
            f"{r['tokens_per_sec']:,.0f} tok/s",
            f"{r['samples_per_sec']:.2f} samples/s",
        ]
        if r["mfu"] is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        if r["memory_gib"] is not None:
            parts.append(f"mem {r['memory_gib']:.1f} GiB")
        if r.get("alloc_retries"):
            parts.append(f"alloc retries {r['alloc_retries']}")
        parts.append(f"data {r['data_wait_s']:.2f}s")
        n_skipped = sum(r["skipped"].values())
        if n_skipped:
            parts.append(f"skipped {n_skipped}")
        if r["data_events"].get("tokenization_mismatch"):
            parts.append(f"masked (mismatch) {r['data_events']['tokenization_mismatch']}")
        if r.get("epoch") is not None:
            parts.append(f"epoch {r['epoch']:.3f}")
        parts.append(f"eta {format_duration(r['eta_s'])}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run_id(dump_folder: str) -> str:
    """The W&B run id of this dump folder, made at its first start and kept in the folder."""
    path = os.path.join(dump_folder, "wandb_run_id")
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    import uuid

    run_id = uuid.uuid4().hex[:16]
    with open(path + ".tmp", "w") as f:
        f.write(run_id + "\n")
    os.replace(path + ".tmp", path)
    return run_id


def plan_line(cfg: Any, total_steps: int, dp_degree: int, grad_accum: int, deferred: bool) -> str:
    """The log line that opens training: the step's shape and when each step's loss is checked."""
    d = cfg.data
    return (
        f"training {total_steps} steps: {dp_degree} data-parallel ranks x {grad_accum} micro-batches "
        f"x {cfg.training.local_batch_size} rows of "
        f"<= {cfg.packing_row_len() if d.packing else d.max_seq_len} tokens"
        + (f" (packed, look-ahead {d.packing_lookahead})" if d.packing else "")
        + (
            "; each step's loss is checked during the next step (fused AdamW skips a "
            "non-finite step on the device), log and checkpoint steps in their own"
            if deferred
            else "; each step's loss is checked before its update"
        )
    )
