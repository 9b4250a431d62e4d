"""The check of each optimizer step without a host sync per step.

A step's loss, SIGTERM flag and gradient norm are reduced over ranks on the device. The host must
see them to stop on a non-finite step (and to log and honour SIGTERM), but reading them waits for
the whole step. With fused AdamW the step can instead be skipped on the device when it is
non-finite (AdamW's `found_inf`, the flag GradScaler uses), so the numbers go to the host
asynchronously and are read during the next step, once that step's forward/backward is queued.
Other AdamW implementations cannot skip: their numbers are read (a sync) before the update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


# The warning torch raises, in `torch.cuda.set_sync_debug_mode("warn")`, for an operation that
# synchronises with the device. Turning the mode on also warns once that it "does not yet detect
# all synchronizing operations": not a sync, so counters match this text, not "synchroniz".
SYNC_WARNING = "called a synchronizing CUDA operation"


def is_sync_warning(message: object) -> bool:
    """Whether a warning (sync-debug mode "warn") reports a host-device sync."""
    return SYNC_WARNING in str(message)


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm of a step is NaN/inf; raised on every rank, with that step's
    update not applied (parameters and AdamW state as after the step before). Terminal: with the
    deferred check the lr scheduler has already moved on, so the run must resume from a checkpoint,
    never continue."""


@dataclass
class StepRecord:
    """One optimizer step as the host sees it: counts of its batches (host), and its loss, stop
    flag and gradient norm, reduced over ranks on the device and copied to the host
    asynchronously, so that reading them can wait until the next step's work is queued."""

    step: int
    counts: dict[str, float]
    data_wait_s: float
    lr: float
    sample_ids: list[int]
    epoch: float = 0.0  # epochs of this rank's data used after the step (the loader's epoch_progress)
    stats: torch.Tensor | None = None  # [loss, stop, grad_norm], host memory (pinned on CUDA)
    ready: torch.cuda.Event | None = None  # recorded after the copy to `stats` (CUDA)
    values: tuple[float, float, float] | None = field(default=None, repr=False)  # once read


class StepCheck:
    """Stages each step's reduced numbers for the host and reads them, now or one step later.
    `defer` (fused AdamW): read later, the optimizer skipping a non-finite step on the device;
    `pending`: the record left for the next step to read; `stop`: some rank got SIGTERM (set when
    a reduced stop flag is read)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.defer = all(g.get("fused") for g in optimizer.param_groups)
        self.pending: StepRecord | None = None
        self.stop = False

    def stage(
        self, record: StepRecord, loss: torch.Tensor, stop: torch.Tensor, grad_norm: torch.Tensor
    ) -> None:
        """Before the optimizer step: send the reduced 0-dim `loss`, `stop`, `grad_norm` to the
        host, then either arm the device-side skip (defer) or read them now (raising
        NonFiniteError before the update)."""
        stats = torch.stack([loss, stop, grad_norm])
        if stats.device.type == "cuda":
            record.stats = torch.empty(3, dtype=stats.dtype, pin_memory=True)
            record.stats.copy_(stats, non_blocking=True)
            record.ready = torch.cuda.Event()
            record.ready.record()
        else:
            record.stats = stats.cpu()
        if self.defer:
            # Every rank computes the same flag from the same reduced numbers, so all skip together.
            # (Elementwise on the 0-dim tensors: indexing `stats` with a list would copy the index
            # to the device synchronously, the very sync this avoids.)
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            self.optimizer.found_inf = (~finite).float()
        else:
            self.read(record)

    def read(self, record: StepRecord) -> tuple[float, float, float]:
        """The step's reduced (loss, stop, grad_norm) on the host, waiting for them if needed.
        Raises NonFiniteError (on every rank: the numbers are the same everywhere)."""
        if record.values is None:
            if record.ready is not None:
                record.ready.synchronize()
            loss, stop, norm = record.stats.tolist()
            record.values = (loss, stop, norm)
            self.stop = self.stop or stop > 0
            if not (math.isfinite(loss) and math.isfinite(norm)):
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteError(
                    f"step {record.step}: non-finite loss ({loss}) or gradient norm ({norm}); "
                    f"stopping without applying it (the parameters are those after step "
                    f"{record.step - 1})"
                )
        return record.values

    def take_pending(self) -> StepRecord | None:
        record, self.pending = self.pending, None
        return record
