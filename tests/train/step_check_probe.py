"""Run by tests in a fresh process: train with the given config overrides and write one JSON
record of when each step's numbers were read on the host and what a non-finite step left behind.

Usage: python -m tests.train.step_check_probe OUT.json --job.config_file ... [--section.key value ...]
"""

from __future__ import annotations

import json
import sys

import torch

from titan_llava.config import load_config
from titan_llava.distributed.utils import destroy_distributed
from titan_llava.trainer import NonFiniteError, Trainer


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in trainer.model.named_parameters()
    }


def main() -> None:
    out_path, argv = sys.argv[1], sys.argv[2:]
    trainer = Trainer(load_config(argv))
    reads: list[list[int]] = []  # [step whose numbers were read, step running at that moment]
    at_start: dict[int, dict[str, torch.Tensor]] = {}  # parameters when each step began
    orig_read, orig_step = trainer._read, trainer.train_step

    def read(record):
        if record.values is None:
            reads.append([record.step, trainer.step])
        return orig_read(record)

    def train_step(mbs, record):
        at_start[trainer.step] = _params(trainer)
        return orig_step(mbs, record)

    trainer._read, trainer.train_step = read, train_step
    error = None
    try:
        trainer.train()
    except NonFiniteError as e:
        error = str(e)
    final = _params(trainer)
    record = {
        "defer_check": trainer.defer_check,
        "reads": reads,
        "error": error,
        "final_finite": all(bool(t.isfinite().all()) for t in final.values()),
        # For each step: the final parameters equal those this step started from.
        "final_equals_start_of": [
            s for s, ps in sorted(at_start.items()) if all(torch.equal(ps[n], final[n]) for n in final)
        ],
    }
    torch.save(final, out_path + ".params.pt")
    trainer.close()
    if trainer.rank == 0:
        with open(out_path, "w") as f:
            json.dump(record, f)
    # Free the trainer (its device mesh keeps the process group alive) before tearing the group down.
    trainer = at_start = final = None
    destroy_distributed()


if __name__ == "__main__":
    main()
