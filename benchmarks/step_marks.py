"""Step-time breakdown of the real Trainer without extra host syncs: named marks (CUDA events on the
GPU, perf_counter on CPU) set by public PyTorch hooks on the vision tower, projector and optimizer.
"""

from __future__ import annotations

import time
from collections import defaultdict
from itertools import pairwise

import torch


class StepMarks:
    """Timestamps at named points of each measured step: CUDA events on the GPU (recorded in
    stream order, read once after the run, so no host sync is added), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.active = False
        self.steps: list[list[tuple[str, object]]] = []

    def begin_step(self) -> None:
        if self.active:
            self.steps.append([])

    def mark(self, name: str) -> None:
        if not self.active or not self.steps:
            return
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.steps[-1].append((name, ev))
        else:
            self.steps[-1].append((name, time.perf_counter()))

    def _ms(self, a: object, b: object) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def breakdown_ms(self) -> dict[str, float]:
        """Mean ms per step in each bucket. A segment between two marks is charged by the mark
        that opens it (the vision tower's forward, its backward, the LLM's, the optimizer's)."""
        totals: dict[str, float] = defaultdict(float)
        for step in self.per_step_ms():
            for bucket, ms in step.items():
                totals[bucket] += ms
        n = max(len(self.steps), 1)
        return {k: v / n for k, v in totals.items()}

    def per_step_ms(self) -> list[dict[str, float]]:
        """Each measured step's ms per bucket (see breakdown_ms)."""
        steps = []
        for marks in self.steps:
            totals: dict[str, float] = defaultdict(float)
            for (name, t0), (nxt, t1) in pairwise(marks):
                if name in ("vis_fwd_start", "vis_bwd_start"):
                    bucket = "vision"
                elif name == "vis_bwd_end":
                    # After the tower's blocks: patch-embedding backward, then waiting for FSDP's
                    # last reduce-scatters and its end-of-backward work.
                    bucket = "bwd_tail"
                elif name in ("opt_start", "opt_end"):
                    bucket = "optimizer"
                elif name == "bwd_end" and nxt == "opt_start":
                    # Incl. the host read of the step's numbers where it is not deferred.
                    bucket = "grad_norm_clip"
                else:
                    bucket = "llm"  # embeddings, projector, LLM forward/backward, loss
                totals[bucket] += self._ms(t0, t1)
            steps.append(dict(totals))
        return steps


def install_probes(trainer, marks: StepMarks) -> None:
    """Hooks on a titan_llava Trainer's vision tower, projector and optimizer (public PyTorch hook
    APIs; the model and the trainer are unchanged)."""
    model = trainer.model
    engine = torch.autograd.Variable._execution_engine

    def vis_pre(_m, _a):
        marks.mark("vis_fwd_start")

    def vis_post(_m, _a, out):
        marks.mark("vis_fwd_end")
        if out.requires_grad:
            out.register_hook(lambda _g: marks.mark("vis_bwd_start"))

    def prenorm_post(_m, _a, out):
        if out.requires_grad:
            # Its gradient is computed once the tower's last block (in backward order) is done.
            out.register_hook(lambda _g: marks.mark("vis_bwd_end"))

    def proj_post(_m, _a, out):
        if out.requires_grad:
            # Runs when the whole backward of this micro-batch is done (after FSDP's callback).
            out.register_hook(lambda _g: engine.queue_callback(lambda: marks.mark("bwd_end")))

    model.vision_tower.register_forward_pre_hook(vis_pre)
    model.vision_tower.register_forward_hook(vis_post)
    model.vision_tower.pre_norm.register_forward_hook(prenorm_post)
    model.projector.register_forward_hook(proj_post)
    trainer.optimizer.register_step_pre_hook(lambda *_: marks.mark("opt_start"))
    trainer.optimizer.register_step_post_hook(lambda *_: marks.mark("opt_end"))
