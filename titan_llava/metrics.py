"""Step metrics: `<dump_folder>/metrics.jsonl` (one JSON object per logged step), a human progress
line with ETA on stdout, and optional TensorBoard / W&B (only when installed and enabled).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any, TextIO

import torch

logger = logging.getLogger(__name__)


def device_memory_gib(device: torch.device | str) -> float | None:
    """Peak allocated memory since the last reset, GiB (CUDA only; None elsewhere). Resets the peak
    so each logged value covers one log interval."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Writes one record per logged step. Only the rank with rank == 0 writes anything.

    All counts passed to `log` are totals over ALL ranks since the previous `log` call (the caller
    all-reduces them); `interval_s` is the wall time of that interval."""

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
                self._wandb = wandb.init(project="titan_llava", dir=dump_folder, config=config)

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
        memory_gib: float | None = None,
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
            "data_wait_s": data_wait_s,
            "step_time_s": step_s,
            "skipped": dict(skipped or {}),
            "eta_s": max(self.total_steps - step, 0) * step_s,
        }
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
        parts.append(f"data {r['data_wait_s']:.2f}s")
        n_skipped = sum(r["skipped"].values())
        if n_skipped:
            parts.append(f"skipped {n_skipped}")
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
