"""Causal attention over packed documents on cuDNN's ragged kernel (`attn_backend = "cudnn"`), as
custom ops the compiled blocks trace whole (fullgraph) and selective AC can save.

On CUDA the forward is `aten._cudnn_attention_forward` with cumulative sequence offsets and the
backward `aten._cudnn_attention_backward`. torch (2.11-2.13) has no fake kernel for those ops and
does not route its own varlen attention to them, so they are wrapped here. Elsewhere (CPU, for
tests) the same ops compute each document alone in fp32: exact, and slow at real lengths.

Layout: q, k, v and the output are [T, H, D] (all rows' tokens flattened); `cu_seqlens` (int32,
[n_docs + 1]) holds the document starts. The log-sum-exp passed from forward to backward is
[H, T] fp32 (flash's convention). Releases differ in what cuDNN returns, so the forward converts
and records the layout, and the backward rebuilds it.
"""

from __future__ import annotations

import itertools
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger("titan_llava")

# How this process's cuDNN forward laid out its log-sum-exp: ("HT" | "TH" | "TH1", strides
# transposed?), set by the first CUDA forward and read by the backward.
_CUDNN_LSE_LAYOUT: tuple[str, bool] | None = None
# The philox seed and offset tensors of the latest CUDA forward. Without dropout they are the
# same constants every call. The backward passes them on, as aten's own derivative does.
_CUDNN_PHILOX: tuple[Tensor, Tensor] | None = None
# The aten namespace the CUDA path calls (a test replaces it with a stub that checks the calls
# against the ops' schemas: the kernels cannot run on CPU).
_aten = torch.ops.aten


def _lse_to_heads_tokens(lse: Tensor, tokens: int, heads: int) -> Tensor:
    """cuDNN's log-sum-exp as [H, T] contiguous; records the layout for the backward."""
    global _CUDNN_LSE_LAYOUT
    shape = tuple(lse.shape)
    if shape == (tokens, heads, 1):
        kind, ht = "TH1", lse[..., 0].t()
    elif shape == (heads, tokens):
        kind, ht = "HT", lse
    elif shape == (tokens, heads):
        kind, ht = "TH", lse.t()
    else:
        raise RuntimeError(
            f"cuDNN ragged attention returned a log-sum-exp of shape {list(shape)} for {tokens} "
            f"tokens x {heads} heads (expected [T, H, 1], [H, T] or [T, H]); use "
            "model.attn_backend 'sdpa'"
        )
    _CUDNN_LSE_LAYOUT = (kind, kind != "HT" and lse.stride(0) == 1 and tokens > 1)
    return ht.float().contiguous()


def _lse_for_cudnn(lse_ht: Tensor) -> Tensor:
    """The [H, T] log-sum-exp in the layout this process's cuDNN forward returned."""
    if _CUDNN_LSE_LAYOUT is None:
        raise RuntimeError("cuDNN varlen backward before any cuDNN varlen forward")
    kind, heads_major = _CUDNN_LSE_LAYOUT
    if kind == "HT":
        return lse_ht
    th = lse_ht.t() if heads_major else lse_ht.t().contiguous()
    return th[..., None] if kind == "TH1" else th


def _documents(cu_seqlens: Tensor):
    bounds = cu_seqlens.tolist()
    return zip(bounds[:-1], bounds[1:])


def _scores(qd: Tensor, kd: Tensor) -> Tensor:
    """Causal scores [H, L, L] of one document's [H, L, D] fp32 q and k (1/sqrt(D) scale)."""
    scores = qd @ kd.transpose(1, 2) / math.sqrt(qd.shape[-1])
    n = qd.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=qd.device).tril()
    return scores.masked_fill(~causal, float("-inf"))


def _reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
    """Each document alone, causal, in fp32: the output in q's dtype and the log-sum-exp [H, T]."""
    outs, lses = [], []
    for start, end in _documents(cu_seqlens):
        qd, kd, vd = (t[start:end].float().transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        scores = _scores(qd, kd)
        lse = torch.logsumexp(scores, dim=-1)  # [H, L]
        outs.append((torch.exp(scores - lse[..., None]) @ vd).transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs).to(q.dtype).contiguous(), torch.cat(lses, dim=1).contiguous()


def _reference_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The attention backward by hand (a custom op's body runs without autograd), in fp32:
    P = exp(S - lse); dV = P^T dO; dS = P * (dO V^T - rowsum(dO * O)); dQ = dS K / sqrt(D);
    dK = dS^T Q / sqrt(D)."""
    grads: list[list[Tensor]] = [[], [], []]
    scale = 1.0 / math.sqrt(q.shape[-1])
    for start, end in _documents(cu_seqlens):
        qd, kd, vd, god, od = (
            t[start:end].float().transpose(0, 1) for t in (q, k, v, grad_out, out)
        )
        p = torch.exp(_scores(qd, kd) - lse[:, start:end, None])
        dv = p.transpose(1, 2) @ god
        ds = p * (god @ vd.transpose(1, 2) - (god * od).sum(-1, keepdim=True))
        dq, dk = ds @ kd * scale, ds.transpose(1, 2) @ qd * scale
        for acc, g in zip(grads, (dq, dk, dv)):
            acc.append(g.transpose(0, 1))
    return tuple(torch.cat(g).to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v)))


def _check_half(q: Tensor) -> None:
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"attn_backend 'cudnn' runs bf16/fp16 activations on CUDA, got {q.dtype}: use "
            "model.attn_backend 'sdpa', or training.mixed_precision_param 'bfloat16'"
        )


def _cudnn_forward(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int
) -> tuple[Tensor, Tensor]:
    global _CUDNN_PHILOX
    _check_half(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # packed [T, H, D] rows
    res = _aten._cudnn_attention_forward(
        q, k, v, None, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, True, 0.0, True, False
    )
    _CUDNN_PHILOX = (res[6], res[7])
    return res[0].contiguous(), _lse_to_heads_tokens(res[1], q.shape[0], q.shape[1])


def _cudnn_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
) -> tuple[Tensor, Tensor, Tensor]:
    if _CUDNN_PHILOX is None:
        raise RuntimeError("cuDNN varlen backward before any cuDNN varlen forward")
    seed, offset = _CUDNN_PHILOX
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq, dk, dv = _aten._cudnn_attention_backward(
        grad_out.contiguous(), q, k, v, out, _lse_for_cudnn(lse), seed, offset, None,
        cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True,
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@torch.library.custom_op("titan_llava::varlen_causal", mutates_args=())
def varlen_causal(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int
) -> tuple[Tensor, Tensor]:
    """Causal attention within each document of [T, H, D] q/k/v: (output [T, H, D], log-sum-exp
    [H, T] fp32)."""
    if q.is_cuda:
        return _cudnn_forward(q, k, v, cu_seqlens, max_seqlen)
    return _reference(q, k, v, cu_seqlens)


@varlen_causal.register_fake
def _(q, k, v, cu_seqlens, max_seqlen):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("titan_llava::varlen_causal_backward", mutates_args=())
def varlen_causal_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
) -> tuple[Tensor, Tensor, Tensor]:
    if q.is_cuda:
        return _cudnn_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen)
    return _reference_backward(grad_out, q, k, v, out, lse, cu_seqlens)


@varlen_causal_backward.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen = max_seqlen


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = varlen_causal_backward(grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen)
    return dq, dk, dv, None, None


varlen_causal.register_autograd(_backward, setup_context=_setup_context)


# Start-up check: three documents whose lengths are not multiples of a tile, the last spanning
# two 128-token tiles and part of a third (a bug confined to its later tiles stays visible in the
# maximum over all tokens).
_CHECK_DOCS = (17, 64, 300)
# Largest |difference| / max |reference| accepted per activation dtype. A flash-style bf16 kernel
# (probabilities and dS rounded to bf16) is off by <= ~6e-3 of the largest value at these sizes
# (32 heads x 128, emulated on the CPU); the exact computation rounded to bf16 by 2-4e-3. A wrong
# layout, mask, tile or operand order is off by order 0.1 to 1 and more.
_CHECK_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}


def startup_check(
    device: torch.device, dtype: torch.dtype, n_heads: int, head_dim: int, op=None
) -> dict[str, float]:
    """Run the route on `device` once at a small size, forward and backward, and compare it with
    each document alone through fp32 SDPA on the CPU (torch's kernel and autograd: independent
    of this module's reference). Returns the relative differences {"out", "lse", "dq", "dk",
    "dv"}; raises RuntimeError naming each one past `dtype`'s tolerance. `op` stands in for
    `varlen_causal` (tests)."""
    op = varlen_causal if op is None else op
    if device.type == "cuda":
        _check_half(torch.empty(0, dtype=dtype))
    g = torch.Generator().manual_seed(0)
    tokens = sum(_CHECK_DOCS)
    q, k, v, grad_out = (
        torch.randn(tokens, n_heads, head_dim, generator=g).to(dtype) for _ in range(4)
    )
    cu = torch.tensor([0, *itertools.accumulate(_CHECK_DOCS)], dtype=torch.int32)

    # Reference: the same dtype-rounded inputs in fp32, one document at a time.
    leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    outs, lses = [], []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qd, kd, vd = (t[start:end].transpose(0, 1) for t in leaves)
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True).transpose(0, 1))
        n = end - start
        scores = (qd.detach() @ kd.detach().transpose(1, 2)) / math.sqrt(head_dim)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        lses.append(torch.logsumexp(scores.masked_fill(~causal, float("-inf")), dim=-1))
    ref_out = torch.cat(outs)
    ref = {"out": ref_out.detach(), "lse": torch.cat(lses, dim=1)}
    ref.update(zip(("dq", "dk", "dv"), torch.autograd.grad(ref_out, leaves, grad_out.float())))

    where = (
        f"model.attn_backend 'cudnn' failed its start-up check on {device} "
        f"(cuDNN {torch.backends.cudnn.version()}, {dtype}, {n_heads} heads x {head_dim}, "
        f"documents of {list(_CHECK_DOCS)} tokens)"
    )
    try:
        dev = [t.to(device).requires_grad_(True) for t in (q, k, v)]
        out, lse = op(*dev, cu.to(device), max(_CHECK_DOCS))
        grads = torch.autograd.grad(out, dev, grad_out.to(device))
        got = {
            name: t.detach().float().cpu()
            for name, t in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads))
        }
    except Exception as e:  # the kernel itself refused or crashed: same message, same fallback
        raise RuntimeError(
            f"{where}: running it raised {type(e).__name__}: {e}. Use model.attn_backend 'sdpa'."
        ) from e

    diffs, bad = {}, []
    tol = _CHECK_TOLERANCE[dtype]
    for name, want in ref.items():
        have = got[name]
        if have.shape != want.shape:
            bad.append(f"{name} has shape {list(have.shape)}, expected {list(want.shape)}")
            diffs[name] = float("inf")
            continue
        diffs[name] = ((have - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
        if not diffs[name] <= tol:  # NaN fails too
            bad.append(f"{name} differs by {diffs[name]:.3g} of its largest value (> {tol:g})")
    if bad:
        raise RuntimeError(
            f"{where} against each document alone through fp32 SDPA: {'; '.join(bad)}. "
            "Use model.attn_backend 'sdpa'."
        )
    return diffs


def check_route(backend: str, llm, device: torch.device, dtype: torch.dtype) -> None:
    """The trainer's check before it builds the model, for attn_backend "cudnn" (no-op for the
    others): refuse GQA (`llm`: VicunaArgs), and on CUDA run `startup_check` (cuDNN's layouts
    differ across torch and cuDNN releases) so that a mismatch stops the run with a clear error
    instead of training on it. Each rank checks its own GPU on the same inputs, so ranks on the
    same kind of GPU agree."""
    if backend != "cudnn":
        return
    if llm.kv_heads != llm.n_heads:
        raise ValueError(
            f"model.attn_backend 'cudnn' has no GQA path, and this LLM has {llm.n_heads} "
            f"query heads but {llm.kv_heads} key/value heads: use 'sdpa'"
        )
    if device.type != "cuda":
        return
    diffs = startup_check(device, dtype, llm.n_heads, llm.head_dim)
    logger.info(
        "attn_backend cudnn: start-up check against fp32 SDPA passed (largest difference / "
        "largest value: " + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()) + ")"
    )
