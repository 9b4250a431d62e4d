"""Which checkpoint a run resumes from: the newest complete step folder, or checkpoint.load_step,
whose first start branches the run (the abandoned trajectory's newer checkpoints moved aside)."""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist

from titan_llava.checkpoint_io import complete_steps, step_dir_name
from titan_llava.distributed.utils import is_distributed

logger = logging.getLogger("titan_llava")


def _broadcast_int(value: int) -> int:
    """Rank 0's value on every rank (rank 0 alone reads the file system, so all ranks agree)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=0)
    return int(t.item())


def find_resume_step(cfg) -> int | None:
    """The step this run resumes from (collective): checkpoint.load_step if set, else the newest
    complete step folder in the run's checkpoint folder; None when there is none (or checkpointing
    is disabled). Incomplete folders are reported and never chosen."""
    ck = cfg.checkpoint
    if not ck.enable:
        return None
    folder = os.path.join(cfg.job.dump_folder, ck.folder)
    chosen = -1
    if not is_distributed() or dist.get_rank() == 0:
        steps, ignored = complete_steps(folder)
        for name in ignored:
            logger.warning(f"ignoring incomplete checkpoint {os.path.join(folder, name)}")
        if ck.load_step >= 0:
            chosen = _branch_from(folder, ck.load_step, steps)
        elif steps:
            chosen = steps[-1]
    chosen = _broadcast_int(chosen)
    if chosen == -2:
        raise ValueError(
            f"checkpoint.load_step = {ck.load_step}: {folder} has no complete checkpoint of that "
            "step (see the log for the complete ones)"
        )
    return None if chosen < 0 else chosen


BRANCH_MARKER = ".load_step_applied"  # in the checkpoint folder: the load_step a start branched from


def _branch_from(folder: str, load_step: int, steps: list[int]) -> int:
    """Rank 0, checkpoint.load_step = N: the step to resume from (-2: no such checkpoint).

    The first start with N moves the complete checkpoints after N (the abandoned trajectory) into
    `abandoned-after-step-N-<time>/` and records N in BRANCH_MARKER, so that neither pruning
    (which keeps the highest steps) nor a later start mixes them with the new branch. Later starts
    of the same command (a requeue after preemption) resume the branch's newest checkpoint
    instead of going back to N every time."""
    marker = os.path.join(folder, BRANCH_MARKER)
    try:
        with open(marker) as f:
            applied = int(f.read().strip())
    except (OSError, ValueError):
        applied = None
    if applied == load_step and steps and steps[-1] >= load_step:
        if steps[-1] > load_step:
            logger.warning(
                f"checkpoint.load_step = {load_step} was applied by an earlier start of this run "
                f"({marker}); resuming its branch from step {steps[-1]} (to branch from step "
                f"{load_step} again, delete {marker})"
            )
        return steps[-1]
    if load_step not in steps:
        return -2
    newer = [s for s in steps if s > load_step]
    if newer:
        dest = os.path.join(folder, f"abandoned-after-step-{load_step}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(dest)
        for step in newer:
            os.rename(os.path.join(folder, step_dir_name(step)), os.path.join(dest, step_dir_name(step)))
        logger.warning(
            f"checkpoint.load_step = {load_step}: the newer checkpoints of the abandoned trajectory "
            f"(steps {', '.join(map(str, newer))}) moved to {dest}"
        )
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{load_step}\n")
    os.replace(tmp, marker)
    return load_step
