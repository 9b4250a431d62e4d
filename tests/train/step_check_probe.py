"""Run by tests (and benchmarks/train_throughput_gpu.sh) in a fresh process: train with the given
config overrides and write one JSON record of when each step's numbers were read on the host, what
a non-finite step left behind (parameters and AdamW state) and, on CUDA, the host syncs of the
steps whose numbers were left for the next step to read.

Usage: python -m tests.train.step_check_probe OUT.json --job.config_file ... [--section.key value ...]
PROBE_NO_DEFER=1 in the environment: read every step before its update (no found_inf).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import traceback
import warnings

import torch

from titan_llava.config import load_config
from titan_llava.distributed.utils import destroy_distributed
from titan_llava.step_check import NonFiniteError, is_sync_warning
from titan_llava.trainer import Trainer


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Parameters and AdamW state (exp_avg, exp_avg_sq, step) by name, full tensors."""
    out = {n: _full(p) for n, p in trainer.model.named_parameters()}
    for n, p in trainer.model.named_parameters():
        for k, v in trainer.optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                out[f"{n}/{k}"] = _full(v)
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sync_site() -> str:
    """'repo_file:line <- innermost_file:line' of the caller's stack, without the warnings
    machinery and without this function and the warning handler that calls it."""
    stack = [f for f in traceback.extract_stack()[:-2] if "warnings.py" not in f.filename]
    ours = [f for f in stack if f.filename.startswith(REPO)
            and os.path.abspath(f.filename) != os.path.abspath(__file__)]
    return " <- ".join(f"{os.path.relpath(f.filename, REPO)}:{f.lineno}"
                       for f in ours[-1:] + stack[-1:])


def main() -> None:
    out_path, argv = sys.argv[1], sys.argv[2:]
    trainer = Trainer(load_config(argv))
    if os.environ.get("PROBE_NO_DEFER") == "1":
        trainer.step_check.defer = False
    cuda = trainer.device.type == "cuda"
    reads: list[list[int]] = []  # [step whose numbers were read, step running at that moment]
    at_start: dict[int, dict[str, torch.Tensor]] = {}  # parameters + state when each step began
    syncs: dict[int, int] = {}  # CUDA: host syncs during each step left pending
    sites: collections.Counter[str] = collections.Counter()  # "step: file:line" of each
    orig_read, orig_step = trainer.step_check.read, trainer.train_step

    def read(record):
        if record.values is None:
            reads.append([record.step, trainer.step])
        return orig_read(record)

    def train_step(mbs, record):
        at_start[trainer.step] = _snapshot(trainer)
        if not cuda:
            return orig_step(mbs, record)
        # Event.synchronize (the intended, late read) is not reported by sync-debug mode. Each
        # sync warning is placed when it is raised: the innermost frame of this repository and
        # the innermost frame overall (the library line that synchronised).
        syncs[record.step] = 0

        def on_warning(message, *_args, **_kw):
            if not is_sync_warning(message):
                return
            syncs[record.step] += 1
            sites[f"{record.step}: {_sync_site()}"] += 1

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = on_warning
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = orig_step(mbs, record)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return out

    trainer.step_check.read, trainer.train_step = read, train_step
    error = None
    try:
        trainer.train()
    except NonFiniteError as e:
        error = str(e)
    final = _snapshot(trainer)
    read_in_own_step = {s for s, during in reads if s == during}
    record = {
        "defer_check": trainer.step_check.defer,
        "reads": reads,
        "error": error,
        "final_finite": all(bool(t.isfinite().all()) for t in final.values()),
        # Steps whose starting parameters AND AdamW state equal the final ones.
        "final_equals_start_of": [s for s, snap in sorted(at_start.items()) if _same(snap, final)],
        # CUDA: host syncs counted inside train_step for the steps read later (their own step
        # runs no read), and for all steps.
        "syncs_in_deferred_steps": sum(n for s, n in syncs.items() if s not in read_in_own_step),
        "syncs_by_step": syncs,
        "sync_sites": dict(sites),
    }
    torch.save({k: v for k, v in final.items() if "/" not in k}, out_path + ".params.pt")
    trainer.close()
    if trainer.rank == 0:
        with open(out_path, "w") as f:
            json.dump(record, f)
    # Free the trainer (its device mesh keeps the process group alive) before tearing the group down.
    trainer = at_start = final = None
    destroy_distributed()


if __name__ == "__main__":
    main()
