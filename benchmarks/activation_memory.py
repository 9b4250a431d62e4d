"""Activation memory of one Vicuna-7B block per token, frozen (stage 1: only the input gradient is
needed, for the projector) vs trainable (stage 2), without activation checkpointing: what autograd
keeps for backward, measured, not estimated.

It runs the real `VicunaBlock` at the 7B shapes in bf16 on CPU for a few hundred tokens (causal
SDPA, no packing) and sums the distinct tensor storages that autograd saves
(`torch.autograd.graph.saved_tensors_hooks`), parameters excluded; `--compile` also measures the
block compiled as the trainer compiles it (the compiler chooses what to save). Full AC keeps only each block's
input (dim x 2 bytes per token). The last lines project the whole 32-block LLM for a micro-batch of
N tokens, beside the bf16 weights: what decides whether stage 1 can drop AC on one GPU.

    python benchmarks/activation_memory.py [--tokens 512] [--micro-batch-tokens 8192 16384]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from titan_llava.distributed.parallelize import compile_block  # noqa: E402
from titan_llava.models.args import LLAVA_FLAVORS  # noqa: E402
from titan_llava.models.vicuna import VicunaBlock, rope_tables  # noqa: E402

GIB = 1024**3


def saved_bytes(block: VicunaBlock, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of distinct storages autograd saves for one forward of `block` over `tokens`."""
    args_dim = block.attention.wq.in_features
    x = torch.randn(1, tokens, args_dim, dtype=dtype, requires_grad=True)
    head_dim = block.attention.head_dim
    cos, sin = rope_tables(head_dim, tokens, 10000.0)
    cos_BSD, sin_BSD = cos[None].to(dtype), sin[None].to(dtype)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in (cos_BSD.untyped_storage().data_ptr(), sin_BSD.untyped_storage().data_ptr()):
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x, cos_BSD, sin_BSD, None)
    out.sum().backward()  # the graph was complete (and everything it saved was needed)
    return sum(seen.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--micro-batch-tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--flavor", default="llava-next-vicuna-7b")
    ap.add_argument("--compile", action="store_true",
                    help="also measure the block under torch.compile (the trainer's per-block compile)")
    a = ap.parse_args(argv)
    args = LLAVA_FLAVORS[a.flavor].llm
    dtype = torch.bfloat16
    torch.manual_seed(0)
    block = VicunaBlock(args, "sdpa").to(dtype)
    block.init_weights(0.02)
    print(f"Vicuna block dim {args.dim}, hidden {args.hidden_dim}, {args.n_heads} heads, bf16, "
          f"{a.tokens} tokens, no AC")
    per_token = {}
    variants = [("frozen", False, False), ("trainable", True, False)]
    if a.compile:
        variants += [("frozen+compile", False, True), ("trainable+compile", True, True)]
    for name, trainable, compiled in variants:
        block.requires_grad_(trainable)
        if compiled:
            torch._dynamo.reset()
            compile_block(block)
        n = saved_bytes(block, a.tokens, dtype)
        per_token[name] = n / a.tokens
        print(f"  {name:<20} {n / 2**20:8.1f} MiB saved = {n / a.tokens / 1024:6.1f} KiB per token "
              f"= {n / a.tokens / 2 / args.dim:5.1f} x dim bf16 values")
    full_ac = 2 * args.dim  # the block input, bf16
    print(f"  full AC: {full_ac / 1024:.1f} KiB per token (the block input only)")
    weights = sum(p.numel() for p in block.parameters()) * args.n_layers * 2
    print(f"\n{args.n_layers} blocks; bf16 block weights {weights / GIB:.1f} GiB (frozen, unsharded)")
    for t in a.micro_batch_tokens:
        cells = ", ".join(f"{name} {per * t * args.n_layers / GIB:5.1f} GiB"
                          for name, per in per_token.items())
        print(f"  {t:>6} tokens/micro-batch, no AC: {cells}; full AC: "
              f"{full_ac * t * args.n_layers / GIB:4.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
