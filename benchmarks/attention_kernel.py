"""Packed-row causal attention at Vicuna-7B shapes: the kernel the LLM blocks run on CUDA (torch's
flash varlen, `attention._torch_varlen_causal`) against cuDNN's ragged attention
(`aten._cudnn_attention_forward` with cumulative sequence offsets, the kernel newer torch
releases route varlen attention to on Hopper) called directly, forward and forward + backward.
Prints ms, TFLOP/s (the FLOP model's convention: causal pairs L(L+1)/2 per document, backward 2x
the forward) and the max difference of the output and the input gradients from an fp32
reference (each document alone through plain causal SDPA in fp32).

    python benchmarks/attention_kernel.py [--doc-lens 2200,2200,...] [--iters 10]

Why: round 6's stage-1 profile put attention at ~149 ms of an ~880 ms step, ~220 TFLOP/s by a
hand count, while the matmuls run at ~800. Torch 2.11's varlen attention is FA2-class; cuDNN's
Hopper kernels use wgmma (round 6's trace shows them serving the vision tower's dense SDPA).
torch 2.13 still routes varlen to flash only, and its cuDNN branch for varlen is disabled. So
this checks the cuDNN kernel's correctness and speed.

The model's opt-in `attn_backend = "cudnn"` route to that kernel was removed after round 7: on
torch 2.11 / cuDNN 9.19 (H100) the ragged backward's gradients were wrong by 1e16 or more and
the forward 50-70x slower than flash. This script stays so that a newer torch / cuDNN can be
re-checked: it still prints the parity against the fp32 reference and the timings.

`--flash-impl FA3` (or FA4) adds the same route after torch's
`activate_flash_attention_impl` (FA4 through `fa4_compat`), as `model.flash_attention_impl`
does: the row that says whether flash-attention 3/4 pays here, with the same parity check.
Its first call compiles flash-attention 4's kernels (CuTe DSL, JIT): the timings come after.

Default: one 16384-token row of stage-1-like documents (7 x ~2200 + a short one). On CPU
(no CUDA) it checks the reference against the dense-mask SDPA the model uses there, at a few
hundred tokens, and says the GPU kernels were skipped.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F
from timing import timed_ms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from titan_llava.flops import attention_flops
from titan_llava.models.attention import (
    VarlenInfo,
    _torch_varlen_causal,
    build_attention_mask,
    causal_attention,
    torch_varlen_usable,
    varlen_info,
)


def reference(q, k, v, doc_lens):
    """Each document alone through plain causal SDPA in fp32: [T, H, D]."""
    outs, start = [], 0
    for n in doc_lens:
        qd, kd, vd = (t[start : start + n].float().transpose(0, 1)[None] for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


# Rows kept to re-check a newer torch or cuDNN, not counted in the verdict: cuDNN's ragged
# backward was wrong by up to 1e34 on torch 2.11 / cuDNN 9.19 (round 7).
REPORT_ONLY = {"cuDNN ragged"}


def cudnn_ragged_outputs(q, k, v, info: VarlenInfo):
    """All outputs of cuDNN's ragged causal attention on [T, H, D] with cumulative offsets:
    (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset, debug)."""
    cu = info.cu_seqlens
    return torch.ops.aten._cudnn_attention_forward(
        q, k, v, None, cu, cu, info.max_seqlen, info.max_seqlen, True, 0.0, True, False
    )


def cudnn_ragged(q, k, v, info: VarlenInfo):
    """Its output (autograd: aten's derivative, `_cudnn_attention_backward`)."""
    return cudnn_ragged_outputs(q, k, v, info)[0]


def describe(t) -> str:
    """'shape [..] stride [..] dtype' of a tensor (what a fake kernel for the op must return)."""
    if not isinstance(t, torch.Tensor):
        return repr(t)
    return f"shape {list(t.shape)} stride {list(t.stride())} {t.dtype}"


def flash_varlen(q, k, v, info: VarlenInfo):
    """The model's CUDA route for packed rows (torch's varlen flash kernel) on [T, H, D]."""
    return _torch_varlen_causal(q[None], k[None], v[None], info, False)[0]


def dense_mask(q, k, v, doc_ids):
    """The model's CPU route: SDPA with a dense boolean document mask."""
    mask = build_attention_mask("sdpa", doc_ids[None], 1, q.shape[0], q.device, dtype=torch.float32)
    return causal_attention(q[None], k[None], v[None], mask, "sdpa", gqa=False)[0]


def layout(doc_lens: list[int], device: torch.device) -> tuple[VarlenInfo, torch.Tensor]:
    """A packed row's VarlenInfo (the model's `varlen_info`) and document ids."""
    ids = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(doc_lens)])
    return varlen_info(ids[None], len(ids)), ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--doc-lens", default=None,
                   help="comma-separated document lengths of the packed row (default: 16384 tokens "
                   "of ~2200-token documents on CUDA, a few hundred tokens on CPU)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--flash-impl", default="",
                   help="also time torch's flash route after activating this implementation "
                   "(torch >= 2.11's registry: FA3, FA4; its package must be installed), as "
                   "model.flash_attention_impl does")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if a.doc_lens:
        doc_lens = [int(n) for n in a.doc_lens.split(",")]
    else:
        doc_lens = [2200] * 7 + [984] if cuda else [150, 90, 16]
    tokens = sum(doc_lens)
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(tokens, a.heads, a.head_dim, device=device, dtype=dtype, generator=g)
               .requires_grad_(True) for _ in range(3))
    grad_out = torch.randn(tokens, a.heads, a.head_dim, device=device, dtype=dtype, generator=g)
    info, _ = layout(doc_lens, device)

    # The reference on fp32 copies (its gradients too: not rounded back to bf16 leaves).
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref_out = reference(q32, k32, v32, doc_lens)
    ref_grads = torch.autograd.grad(ref_out, (q32, k32, v32), grad_out.float())
    ref_out = ref_out.detach()
    cudnn_version = torch.backends.cudnn.version() if cuda else None
    print(f"packed causal attention: 1 row of {tokens} tokens, {len(doc_lens)} documents "
          f"(max {max(doc_lens)}), {a.heads} heads x {a.head_dim}, {dtype}, on "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'} (torch {torch.__version__}, "
          f"cuDNN {cudnn_version})")
    fwd_flops = attention_flops(a.heads * a.head_dim, doc_lens, backward=False)
    all_flops = attention_flops(a.heads * a.head_dim, doc_lens, backward=True)
    print(f"{'kernel':34s} {'fwd ms':>8s} {'TFLOP/s':>8s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s} "
          f"{'out diff':>9s} {'grad diff':>9s}  (diff: max |x - ref| / max |ref|, fp32 reference)")
    # Each kernel takes a layout (VarlenInfo, document ids). The same tokens are also timed
    # cycling through three packings, as training meets a new one every step (a kernel that
    # rebuilds a plan per packing shows it there).
    kernels = {"dense mask (the CPU route)": lambda lay: dense_mask(q, k, v, lay[1])}
    if cuda:
        kernels = {"flash varlen (the model's route)": lambda lay: flash_varlen(q, k, v, lay[0]),
                   "cuDNN ragged": lambda lay: cudnn_ragged(q, k, v, lay[0])}
    halves = [tokens // 2, tokens - tokens // 2]
    small = [tokens // 16] * 15 + [tokens - 15 * (tokens // 16)]
    layouts = [layout(doc_lens, device), layout(halves, device), layout(small, device)]
    if cuda and a.flash_impl:
        # Last: activating an implementation reroutes torch's flash ops for the whole process.
        kernels[f"flash varlen ({a.flash_impl})"] = kernels["flash varlen (the model's route)"]
    ok = True
    for name, fn in kernels.items():
        if name.startswith("flash") and not torch_varlen_usable(device, dtype):
            print(f"{name:34s} skipped: this torch has no varlen attention")
            continue
        try:
            if name == f"flash varlen ({a.flash_impl})":
                from titan_llava.models.flash_impl import activate_torch_impl

                activate_torch_impl(a.flash_impl)
            out = fn(layouts[0])
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
        except Exception as e:  # noqa: BLE001 - report the kernel's refusal and go on
            print(f"{name:34s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            ok = ok and name in REPORT_ONLY
            continue
        out_diff = (out.float() - ref_out).abs().max().item() / ref_out.abs().max().item()
        grad_diff = max((gr.float() - rg).abs().max().item() / rg.abs().max().item()
                        for gr, rg in zip(grads, ref_grads))

        def fwd_bwd(fn=fn, lay=layouts[0]):
            torch.autograd.grad(fn(lay), (q, k, v), grad_out)

        packings = itertools.cycle(layouts)

        def fwd_bwd_cycling(fn=fn, packings=packings):
            torch.autograd.grad(fn(next(packings)), (q, k, v), grad_out)

        ms = timed_ms(lambda fn=fn: fn(layouts[0]), a.iters, cuda)
        ms_fb = timed_ms(fwd_bwd, a.iters, cuda)
        ms_cyc = timed_ms(fwd_bwd_cycling, a.iters, cuda)
        print(f"{name:34s} {ms:8.3f} {fwd_flops / ms / 1e9:8.1f} {ms_fb:11.3f} "
              f"{all_flops / ms_fb / 1e9:8.1f} {out_diff:9.2e} {grad_diff:9.2e}  cycling 3 "
              f"packings: {ms_cyc:.3f} ms fwd+bwd")
        if name == "flash varlen (FA4)":  # proof that the row ran flash-attention 4's kernels
            from titan_llava.models.fa4_compat import calls

            print(f"{'':34s} flash-attention 4 kernel calls: {calls['forward']} forward, "
                  f"{calls['backward']} backward")
        # bf16 on CUDA: a few bf16 roundings of O(1) values; fp32 on CPU: float error only.
        if name not in REPORT_ONLY:
            ok &= out_diff < (2e-2 if cuda else 1e-5) and grad_diff < (5e-2 if cuda else 1e-5)
    if cuda:
        # What a fake kernel (for a custom op the compiled blocks can trace) must return.
        try:
            outs = cudnn_ragged_outputs(q.detach(), k.detach(), v.detach(), info)
            names = ("output", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
                     "philox_seed", "philox_offset", "debug_attn_mask")
            for n, t in zip(names, outs):
                print(f"  cuDNN ragged {n}: {describe(t)}")
        except Exception as e:  # noqa: BLE001 - already reported above
            print(f"  cuDNN ragged outputs: {type(e).__name__}")
    else:
        print("flash varlen, cuDNN ragged: skipped (need CUDA)")
    print("ATTENTION KERNELS " + ("OK" if ok else "FAILED")
          + f" (report only, not counted: {', '.join(sorted(REPORT_ONLY))})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
