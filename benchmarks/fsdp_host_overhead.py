"""Host (Python) time per transformer block and step of the wrappers the trainer puts around a
block: per-block compile, activation checkpointing, and an FSDP2 unit per block. Tiny tensors on
the CPU, so the compute is negligible and what is left is the wrappers' own host work, which a GPU
cannot hide when a block's kernels are shorter than it (the CLIP tower's 23 blocks at LLaVA-NeXT
tile counts; `parallelism.fsdp_vision_unit`).

    python benchmarks/fsdp_host_overhead.py [--blocks 23] [--iters 20]

One process, a world-size-1 gloo group (FSDP2 still runs its all-gather / reduce-scatter path).
Figures are this machine's host speed: compare rows with each other, not with another machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from titan_llava.distributed.parallelize import checkpoint_block, compile_block  # noqa: E402
from titan_llava.models.args import CLIPVisionArgs  # noqa: E402
from titan_llava.models.clip import CLIPBlock  # noqa: E402

ARGS = CLIPVisionArgs(image_size=28, patch_size=14, dim=32, n_layers=24, n_heads=2, hidden_dim=64)
# (label, backward, AC mode, compile, FSDP unit per block)
CASES = [
    ("forward only, compiled", False, None, True, False),
    ("forward only, compiled, FSDP unit", False, None, True, True),
    ("fwd+bwd, compiled", True, None, True, False),
    ("fwd+bwd, compiled, FSDP unit", True, None, True, True),
    ("fwd+bwd, compiled, selective AC", True, "op", True, False),
    ("fwd+bwd, compiled, selective AC, FSDP unit", True, "op", True, True),
]


def build(n: int, ac: str | None, compiled: bool, fsdp: bool, mesh) -> list[torch.nn.Module]:
    blocks = [CLIPBlock(ARGS) for _ in range(n)]
    for b in blocks:
        if ac:
            checkpoint_block(b, op_policy="op" if ac == "op" else "")
        if compiled:
            compile_block(b)
        if fsdp:
            fully_shard(b, mesh=mesh)
    return blocks


def ms_per_block(blocks: list[torch.nn.Module], backward: bool, iters: int) -> float:
    x0 = torch.randn(3, 5, ARGS.dim, requires_grad=backward)

    def once() -> None:
        x = x0
        for b in blocks:
            x = b(x)
        if backward:
            x.sum().backward()

    with torch.enable_grad() if backward else torch.no_grad():
        for _ in range(3):  # compile and warm up
            once()
        t0 = time.perf_counter()
        for _ in range(iters):
            once()
    return (time.perf_counter() - t0) / iters / len(blocks) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=23, help="blocks in the chain (CLIP-L/14 in LLaVA: 23)")
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    own_group = not dist.is_initialized()
    if own_group:
        sock = __import__("socket").socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    print(f"host ms per block per step, {a.blocks} tiny CLIP blocks, {a.iters} steps, torch {torch.__version__}")
    for label, backward, ac, compiled, fsdp in CASES:
        ms = ms_per_block(build(a.blocks, ac, compiled, fsdp, mesh), backward, a.iters)
        print(f"  {label:45s} {ms:7.3f} ms")
    if own_group:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
