"""Rotary embedding (RoPE) at Vicuna-7B shapes: the model's compiled kernel against other
formulations and other inductor tunings, forward and forward + backward. Prints ms per call, the
effective memory bandwidth, the max difference from the model's RoPE, and (CUDA) the launch of
each compiled Triton kernel: block of elements, warps, registers.

    python benchmarks/rope_kernel.py [--tokens 16384] [--iters 20] [--no-compile]

Why: round 6's stage-1 profile (benchmarks/README.md) had the compiled RoPE kernels at ~57 ms of a
~966 ms profiled step. Each forward call rotated q or k (128 MiB in, 128 MiB out at 16384 tokens)
in ~0.52 ms, about 0.5 TB/s, while the SwiGLU kernel of the same blocks ran at ~2.9 TB/s. The
trace says more: in the 31 full blocks, the RoPE forward and backward kernels were the only
pointwise kernels launched with 512-element blocks of 8 warps (2 elements per thread; 45 and 32
registers), where the others ran 1024-element blocks of 4 warps (8 per thread). Inductor autotunes
a pointwise kernel between those two launches on its first call. The PTX of inductor's code for
this RoPE (built for sm_90 without a GPU, Triton 3.9) has 16-byte loads and stores at 1024/4 and
4-byte ones at 512/8. The 'swap' form (below) compiles to scalar 2-byte loads of the rotated
operand, at either launch. So the variants separate the launch choice from the formulation.

Variants, each on q and k [1, S, 32 x 128] in bf16, viewed into heads inside (as the block does),
with fp32 cos/sin tables gathered by position (as `Vicuna.forward` passes them):
- `rotate_half`: `titan_llava.models.vicuna.apply_rope`, the model's (HF Llama's) form
  x * cos + rotate_half(x) * sin with rotate_half(x) = cat([-x2, x1]);
- `halves`: the rotation written on the two halves of head_dim and concatenated:
  out = [x1 cos - x2 sin, x2 cos + x1 sin] (cos and sin hold each frequency twice, so the first
  half of the tables is enough);
- `swap`: x * cos + [x2, x1] * sin_signed, the halves swapped by an index map (no `cat`, no
  mask) and rotate-half's minus sign carried by the first half of the sin table.
All three are the same products and sums. Each compiled with dynamic=True (as `compile_block`)
and dynamic=False, plus eager; the model's form also with inductor's pointwise autotuning off
(one launch, 1024/4 at these sizes) and with coordinate-descent tuning. On CPU (no CUDA) it
runs a few hundred tokens eagerly, as a check of the equality.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile

import torch
from timing import timed_ms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from titan_llava.models.vicuna import apply_rope, rope_tables  # noqa: E402


def rope_halves(x_BSHD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    half = x_BSHD.shape[-1] // 2
    cos = cos_BSD[:, :, None, :half].to(x_BSHD.dtype)
    sin = sin_BSD[:, :, None, :half].to(x_BSHD.dtype)
    x1, x2 = x_BSHD[..., :half], x_BSHD[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def signed_sin(sin_BSD: torch.Tensor) -> torch.Tensor:
    """The sin table with rotate-half's minus sign on its first half (for `rope_swap`)."""
    half = sin_BSD.shape[-1] // 2
    return torch.cat([-sin_BSD[..., :half], sin_BSD[..., half:]], dim=-1)


def rope_swap(x_BSHD: torch.Tensor, cos_BSD: torch.Tensor, sin_signed_BSD: torch.Tensor) -> torch.Tensor:
    cos = cos_BSD[:, :, None].to(x_BSHD.dtype)
    sin = sin_signed_BSD[:, :, None].to(x_BSHD.dtype)
    swapped = x_BSHD.unflatten(-1, (2, x_BSHD.shape[-1] // 2)).flip(-2).flatten(-2)
    return x_BSHD * cos + swapped * sin


def qk_rope(rope, heads: int, head_dim: int):
    """As in `Attention.forward`: q and k arrive as the projections' [B, S, heads * head_dim]
    outputs and are viewed into heads with Python ints (static under compile); only the tables
    and the sequence length come in as inputs."""
    def f(q_BSD, k_BSD, cos, sin):
        b, s, _ = q_BSD.shape
        q = q_BSD.view(b, s, heads, head_dim)
        k = k_BSD.view(b, s, heads, head_dim)
        return rope(q, cos, sin), rope(k, cos, sin)
    return f


def packed_positions(tokens: int, doc_len: int, device: str) -> torch.Tensor:
    """Positions of a packed row: each document restarts at 0 (as the packer's rows do)."""
    return (torch.arange(tokens, device=device) % doc_len)[None]


def triton_launches(fn) -> list[str]:
    """The Triton kernels one call of `fn` launches (CUDA), from a profiler trace (grid, block
    and registers are only in its JSON)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json.gz")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        prof.export_chrome_trace(path)
        with gzip.open(path, "rt") as f:
            return launch_lines(json.load(f)["traceEvents"])


def launch_lines(events: list[dict]) -> list[str]:
    """'name: grid G, W warps, R registers, T us' for each Triton kernel of a trace, in order."""
    lines = []
    for e in sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"]):
        if not e["name"].startswith("triton"):
            continue
        args = e.get("args", {})
        threads = 1
        for n in args.get("block", [0]):
            threads *= n
        lines.append(f"    {e['name'][:70]}: grid {args.get('grid')}, {threads // 32} warps, "
                     f"{args.get('registers per thread', '?')} registers, {e['dur']:.0f} us")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=None, help="default: 16384 on CUDA, 256 on CPU")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--doc-len", type=int, default=2200, help="tokens per packed document")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled variants (default: on CUDA only)")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16
    tokens = a.tokens or (16384 if cuda else 256)
    use_compile = cuda if a.compile is None else a.compile
    g = torch.Generator(device=device).manual_seed(0)
    shape = (1, tokens, a.heads * a.head_dim)
    q = torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_(True)
    k = torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_(True)
    out_shape = (1, tokens, a.heads, a.head_dim)
    gq = torch.randn(out_shape, device=device, dtype=dtype, generator=g)
    gk = torch.randn(out_shape, device=device, dtype=dtype, generator=g)
    cos_t, sin_t = rope_tables(a.head_dim, 4096, 10000.0, device=torch.device(device))
    pos = packed_positions(tokens, a.doc_len, device)
    cos, sin = cos_t[pos], sin_t[pos]

    hd = (a.heads, a.head_dim)
    forms = {"rotate_half": (apply_rope, sin), "halves": (rope_halves, sin),
             "swap": (rope_swap, signed_sin(sin))}
    # name -> (function, sin table, compiled?)
    variants = {f"{name} eager": (qk_rope(rope, *hd), s_, False) for name, (rope, s_) in forms.items()}
    if use_compile:
        # The model's form first, as the blocks compile it, then its tunings: if the time limit
        # stops the run, the rows that matter most are out.
        compiled = [("rotate_half compiled dynamic=True", apply_rope, sin, True, {}),
                    ("rotate_half compiled dynamic=True, no pointwise autotune", apply_rope, sin,
                     True, {"triton.autotune_pointwise": False}),
                    ("rotate_half compiled dynamic=True, coordinate descent", apply_rope, sin,
                     True, {"coordinate_descent_tuning": True})]
        compiled += [(f"{name} compiled dynamic={dyn}", rope, s_, dyn, {})
                     for name, (rope, s_) in forms.items() for dyn in (True, False)
                     if (name, dyn) != ("rotate_half", True)]
        for name, rope, s_, dyn, options in compiled:
            variants[name] = (torch.compile(qk_rope(rope, *hd), dynamic=dyn, options=options or None),
                              s_, True)

    def outputs(fn, s_):
        oq, ok = fn(q, k, cos, s_)
        return (oq, ok, *torch.autograd.grad((oq, ok), (q, k), (gq, gk)))

    # Each variant against the model's form run the same way: eager against eager (bf16 rounding
    # after every op), compiled against the model's compiled kernel (fused in fp32, rounded once).
    refs = {"eager": outputs(qk_rope(apply_rope, *hd), sin)}
    if use_compile:
        refs["compiled"] = outputs(*variants["rotate_half compiled dynamic=True"][:2])
    # Bytes the forward must move: q and k in, their rotations out (the tables, ~6% more, are
    # left out: small, and read from cache across the heads). "fwd ms" is for q and k together.
    fwd_bytes = 4 * q.numel() * q.element_size()
    print(f"RoPE on q and k [1, {tokens}, {a.heads} x {a.head_dim}] {dtype}, packed documents of "
          f"{a.doc_len} tokens, on {torch.cuda.get_device_name() if cuda else 'cpu'} "
          f"(torch {torch.__version__}); forward moves {fwd_bytes / 2**20:.0f} MiB (q and k together)")
    print(f"{'variant':62s} {'fwd ms':>8s} {'fwd GB/s':>9s} {'fwd+bwd ms':>11s} {'max diff fwd':>13s} "
          f"{'max diff grad':>14s}  (diff: against the model's rope, eager or compiled alike)")
    for name, (fn, s_, compiled) in variants.items():
        if compiled:
            # The qk_rope closures share one code object, and dynamo caches per code object:
            # start each compiled variant from an empty cache so none reuses another's graph.
            torch._dynamo.reset()
        got, ref = outputs(fn, s_), refs["compiled" if compiled else "eager"]
        diff, gdiff = (max((x.float() - y.float()).abs().max().item() for x, y in pairs)
                       for pairs in (zip(got[:2], ref[:2]), zip(got[2:], ref[2:])))

        def fwd():  # with autograd on, as in the blocks (the training graph's forward)
            fn(q, k, cos, s_)

        def fwd_bwd():
            oq, ok = fn(q, k, cos, s_)
            torch.autograd.grad((oq, ok), (q, k), (gq, gk))

        ms = timed_ms(fwd, a.iters, cuda)
        ms_fb = timed_ms(fwd_bwd, a.iters, cuda)
        print(f"{name:62s} {ms:8.3f} {fwd_bytes / ms / 1e6:9.0f} {ms_fb:11.3f} {diff:13.3e} "
              f"{gdiff:14.3e}")
        if compiled and cuda:
            print("\n".join(triton_launches(fwd_bwd)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
