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

`--ac-policies` also measures a trainable block under each activation-checkpointing policy the
trainer offers (none, full, selective "op" and "op_all_mm"; eager, and with `--compile` also
compiled: what the compiled forward saves, the block input included): what stays alive after its
forward (autograd's saved tensors, the selective policy's cache of op outputs, the checkpoint's
saved input), by storages traced through a dispatch mode and checked alive by weak reference;
the block's input and output and the parameters excluded. The no-AC figure is the same quantity
as the saved-tensor count above, measured another way.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from titan_llava.distributed.parallelize import (  # noqa: E402
    apply_activation_checkpointing,
    compile_block,
)
from titan_llava.models.args import LLAVA_FLAVORS  # noqa: E402
from titan_llava.models.vicuna import VicunaBlock, rope_tables  # noqa: E402

GIB = 1024**3


def _block_inputs(block: VicunaBlock, tokens: int, dtype: torch.dtype):
    """One row of `tokens` hidden states (requiring grad) and its RoPE tables, [1, S, D]."""
    x = torch.randn(1, tokens, block.attention.wq.in_features, dtype=dtype, requires_grad=True)
    cos, sin = rope_tables(block.attention.head_dim, tokens, 10000.0)
    return x, cos[None].to(dtype), sin[None].to(dtype)


def saved_bytes(block: VicunaBlock, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of distinct storages autograd saves for one forward of `block` over `tokens`."""
    x, cos_BSD, sin_BSD = _block_inputs(block, tokens, dtype)
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


class _Storages(torch.utils._python_dispatch.TorchDispatchMode):
    """Every storage an op returns while active, as (weak reference, pointer, bytes). Freed
    memory is reused, so a pointer alone does not name a storage: what is alive at the end is
    told by the weak references."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef

        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                self.made.append((StorageWeakRef(st), st.data_ptr(), st.nbytes()))
        return out

    def alive(self, skip: set[int]) -> int:
        """Bytes of the distinct storages still alive, those at the `skip` pointers excluded."""
        live = {ptr: n for ref, ptr, n in self.made if not ref.expired() and ptr not in skip}
        return sum(live.values())


def retained_bytes(block: nn.Module, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of the storages made during one forward of `block` that are still alive after it
    (what the backward will use), the output, the input, the RoPE tables and the parameters
    (whose transposed views ops return) excluded; then runs the backward."""
    import gc

    x, cos_BSD, sin_BSD = _block_inputs(block, tokens, dtype)
    with _Storages() as mode:
        out = block(x, cos_BSD, sin_BSD, None)
    gc.collect()
    skip = {t.untyped_storage().data_ptr() for t in (out, x, cos_BSD, sin_BSD)}
    skip |= {p.untyped_storage().data_ptr() for p in block.parameters()}
    alive = mode.alive(skip)
    out.sum().backward()
    return alive


def ac_policy_bytes(args, tokens: int, dtype: torch.dtype, compiled: bool = False) -> dict[str, int]:
    """retained_bytes of a trainable block under each policy (fresh block per policy). `compiled`:
    the block compiled as the trainer compiles it (the checkpoint's policy inside the compiled
    region, the partitioner choosing what to save): saved_bytes of the compiled forward's
    save_for_backward, which includes the block's input (the eager figure excludes it, and counts
    the SAC cache's copy of the last matmul's output, which no backward reads)."""
    policies = {"none": ("none", "op"), "full": ("full", "op"), "selective op": ("selective", "op"),
                "selective op_all_mm": ("selective", "op_all_mm")}
    res = {}
    for name, (mode, option) in policies.items():
        torch.manual_seed(0)
        block = VicunaBlock(args, "sdpa").to(dtype)
        block.init_weights(0.02)
        apply_activation_checkpointing(nn.ModuleDict({"0": block}), mode, option)
        if compiled:
            torch._dynamo.reset()
            compile_block(block)
            res[name] = saved_bytes(block, tokens, dtype)
        else:
            res[name] = retained_bytes(block, tokens, dtype)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--micro-batch-tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--flavor", default="llava-next-vicuna-7b")
    ap.add_argument("--compile", action="store_true",
                    help="also measure the block under torch.compile (the trainer's per-block compile)")
    ap.add_argument("--ac-policies", action="store_true",
                    help="also measure a trainable block under each AC policy (eager)")
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
    policy_per_token = {}
    if a.ac_policies:
        print("trainable block, eager, alive after its forward (block input and output excluded):")
        for name, n in ac_policy_bytes(args, a.tokens, dtype).items():
            policy_per_token[name] = n / a.tokens
            print(f"  AC {name:<20} {n / 2**20:8.1f} MiB = {n / a.tokens / 1024:6.1f} KiB per "
                  f"token = {n / a.tokens / 2 / args.dim:5.1f} x dim bf16 values")
        if a.compile:
            print("trainable block, compiled, saved for backward (block input included):")
            for name, n in ac_policy_bytes(args, a.tokens, dtype, compiled=True).items():
                policy_per_token[f"{name} (compiled)"] = n / a.tokens
                print(f"  AC {name + ' (compiled)':<31} {n / 2**20:8.1f} MiB = {n / a.tokens / 1024:6.1f} "
                      f"KiB per token = {n / a.tokens / 2 / args.dim:5.1f} x dim bf16 values")
    weights = sum(p.numel() for p in block.parameters()) * args.n_layers * 2
    print(f"\n{args.n_layers} blocks; bf16 block weights {weights / GIB:.1f} GiB (frozen, unsharded)")
    for t in a.micro_batch_tokens:
        cells = ", ".join(f"{name} {per * t * args.n_layers / GIB:5.1f} GiB"
                          for name, per in per_token.items())
        print(f"  {t:>6} tokens/micro-batch, no AC: {cells}; full AC: "
              f"{full_ac * t * args.n_layers / GIB:4.1f} GiB")
        if policy_per_token:
            print("         trainable, by AC policy: " + ", ".join(
                f"{name} {per * t * args.n_layers / GIB:5.1f} GiB"
                for name, per in policy_per_token.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
