"""Run by tests in a fresh process (python or torchrun): train a few steps with the given config
overrides and print one JSON line describing what changed, for the stage tests.

Usage: python -m tests.train.stage_probe OUT.json --job.config_file ... [--section.key value ...]
"""

from __future__ import annotations

import json
import sys

import torch

from titan_llava.config import load_config
from titan_llava.distributed.utils import destroy_distributed
from titan_llava.optim import part_of
from titan_llava.trainer import Trainer


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def main() -> None:
    out_path, argv = sys.argv[1], sys.argv[2:]
    trainer = Trainer(load_config(argv))
    before = {n: _full(p) for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = {n: _full(p) for n, p in trainer.model.named_parameters()}
    changed = {n: not torch.equal(before[n], after[n]) for n in before}
    state = trainer.optimizer.state
    groups = [
        {
            "name": g["name"],
            "lr": g["initial_lr"],
            "weight_decay": g["weight_decay"],
            "parts": sorted({part_of(n) for n, p in trainer.model.named_parameters()
                             if any(p is q for q in g["params"])}),
            "n_params": len(g["params"]),
            "n_with_state": sum(1 for p in g["params"] if p in state and state[p]),
        }
        for g in trainer.optimizer.param_groups
    ]
    record = {
        "changed": changed,
        "requires_grad": {n: p.requires_grad for n, p in trainer.model.named_parameters()},
        "dtypes": {n: str(p.dtype).removeprefix("torch.") for n, p in trainer.model.named_parameters()},
        "groups": groups,
        "n_state": len(state),
    }
    trainer.close()
    if trainer.rank == 0:
        with open(out_path, "w") as f:
            json.dump(record, f)
    # Free the trainer (its device mesh keeps the process group alive), then tear the group down
    # while Python is fully alive: freed during finalisation, gloo's threads can abort the process.
    del trainer, state, groups
    destroy_distributed()


if __name__ == "__main__":
    main()
