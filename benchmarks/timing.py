"""Timing for the micro-benchmarks: ms per call of a function, by CUDA events on the GPU (three
warm-up calls first, then `iters` calls between two events, one sync at the end), by
perf_counter on CPU."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed_ms(fn: Callable[[], object], iters: int, cuda: bool) -> float:
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e3
