"""Causal self-attention for Vicuna with three backends (SDPA, FlexAttention, flash-attn varlen), all
honouring packed rows: with `document_ids`, a token attends causally and only within its document.
The mask is built once per forward (`build_attention_mask`) and shared by every block. On CUDA in
bf16/fp16, sdpa's packed rows run on torch's flash varlen kernel instead of a dense boolean mask.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from torch.nn.attention.flex_attention import (
        BlockMask,
        create_block_mask,
        flex_attention,
    )
except ImportError:  # pragma: no cover - very old torch
    BlockMask = create_block_mask = flex_attention = None  # type: ignore[assignment]

try:  # torch >= 2.10: flash varlen kernels inside torch (CUDA only)
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # pragma: no cover - older torch
    _torch_varlen_attn = None

# torch 2.10 spells causal `is_causal=True`; later releases `window_size=(-1, 0)`.
_VARLEN_PARAMS = (
    set(inspect.signature(_torch_varlen_attn).parameters) if _torch_varlen_attn is not None else set()
)
_VARLEN_CAUSAL = {"window_size": (-1, 0)} if "window_size" in _VARLEN_PARAMS else {"is_causal": True}


@dataclass
class VarlenInfo:
    """Document boundaries of the flattened [B*S] token stream, for a varlen kernel (flash-attn's,
    or torch's own for sdpa's packed rows on CUDA)."""

    cu_seqlens: Tensor  # int32 [n_docs + 1]
    max_seqlen: int


# None: plain causal; Tensor: boolean [B, 1, S, S] (True = may attend); BlockMask: flex; VarlenInfo.
AttentionMask = None | Tensor | BlockMask | VarlenInfo


def check_backend(backend: str, device: torch.device) -> None:
    """Refuse, before any model exists, an attention backend this run cannot train with (the
    forward would otherwise fail at the first step, after the weights are loaded)."""
    if backend == "flash":
        _flash_attn()
    elif backend == "flex" and device.type == "cpu":
        raise ValueError(
            "model.attn_backend 'flex' cannot train on the CPU (torch's flex attention has no CPU "
            "backward); use 'sdpa'"
        )


def _flash_attn():
    try:
        import flash_attn
    except ImportError as e:
        raise ValueError(
            "model.attn_backend 'flash' needs the flash-attn package (pip install flash-attn); "
            "use attn_backend 'sdpa' or 'flex' instead"
        ) from e
    return flash_attn


def torch_varlen_usable(device: torch.device, dtype: torch.dtype | None, gqa: bool = False) -> bool:
    """Whether the sdpa backend sends packed rows to torch's flash varlen kernel: CUDA, fp16/bf16,
    and a torch that has `torch.nn.attention.varlen` (GQA only where that kernel supports it)."""
    return (
        _torch_varlen_attn is not None
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and (not gqa or "enable_gqa" in _VARLEN_PARAMS)
    )


def varlen_info(document_ids_BS: Tensor, seq_len: int) -> VarlenInfo:
    """Cumulative document starts of the flattened rows (a new row always starts a new sequence).
    On a device tensor this synchronises (the kernels need max_seqlen as an int); the trainer builds
    it from the host copy of the batch instead and passes it in as `document_bounds`."""
    flat = document_ids_BS.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::seq_len] = True
    idx = torch.nonzero(starts).flatten()
    cu = torch.cat([idx, idx.new_tensor([flat.numel()])]).to(torch.int32)
    return VarlenInfo(cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max().item()))


def build_attention_mask(
    backend: str,
    document_ids_BS: Tensor | None,
    batch: int,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    gqa: bool = False,
    document_bounds: VarlenInfo | None = None,
) -> AttentionMask:
    """The per-forward mask object for `backend`; `document_ids_BS` None means one document per row.

    Tokens of the same document must be contiguous within a row (packing guarantees it). Padding may
    carry any id: every token always sees itself, so no softmax row is ever empty (no NaN).
    `dtype` (of the activations) and `gqa` only matter for sdpa's packed rows: where
    `torch_varlen_usable`, they run on torch's flash varlen kernel (same mask, no dense [B,1,S,S]
    mask, which would rule the flash kernel out); elsewhere (CPU, fp32) on SDPA with the dense mask.
    `document_bounds`: `varlen_info(document_ids_BS)` computed beforehand (on the host, with no
    device sync); used where a varlen kernel runs, ignored elsewhere.
    """
    if backend == "sdpa":
        if document_ids_BS is None:
            return None
        if torch_varlen_usable(device, dtype, gqa):
            return document_bounds or varlen_info(document_ids_BS, seq_len)
        same_doc_BSS = document_ids_BS[:, :, None] == document_ids_BS[:, None, :]
        causal_SS = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
        return (same_doc_BSS & causal_SS)[:, None]
    if backend == "flex":
        if document_ids_BS is None:

            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx

            return create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device)
        doc_BS = document_ids_BS

        def doc_mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc_BS[b, q_idx] == doc_BS[b, kv_idx])

        return create_block_mask(doc_mask_mod, batch, None, seq_len, seq_len, device=device)
    if backend == "flash":
        _flash_attn()
        if document_ids_BS is None:
            return None
        return document_bounds or varlen_info(document_ids_BS, seq_len)
    raise ValueError(f"unknown attn_backend {backend!r} (expected 'sdpa', 'flex' or 'flash')")


def _torch_varlen_causal(
    q_BSHD: Tensor, k_BSHD: Tensor, v_BSHD: Tensor, info: VarlenInfo, gqa: bool
) -> Tensor:
    b, s = q_BSHD.shape[:2]
    extra = {"enable_gqa": True} if gqa else {}
    out = _torch_varlen_attn(
        q_BSHD.flatten(0, 1),
        k_BSHD.flatten(0, 1),
        v_BSHD.flatten(0, 1),
        info.cu_seqlens,
        info.cu_seqlens,
        info.max_seqlen,
        info.max_seqlen,
        **_VARLEN_CAUSAL,
        **extra,
    )
    return out.unflatten(0, (b, s))


def causal_attention(
    q_BSHD: Tensor,
    k_BSHD: Tensor,
    v_BSHD: Tensor,
    mask: AttentionMask,
    backend: str,
    gqa: bool | None = None,
) -> Tensor:
    """Causal (optionally document-confined) attention; k/v may have fewer heads (GQA).

    Returns [B, S, H, D] with the default 1/sqrt(D) scale. `gqa` (k/v have fewer heads than q)
    should come from the model's configuration: under dynamic-shape compile, comparing the head
    dimensions gives a SymBool that SDPA's enable_gqa refuses (a graph break that leaves a whole
    checkpointed block uncompiled). None compares the shapes (eager use).
    """
    if gqa is None:
        gqa = k_BSHD.shape[2] != q_BSHD.shape[2]
    if backend == "sdpa":
        if isinstance(mask, VarlenInfo):
            return _torch_varlen_causal(q_BSHD, k_BSHD, v_BSHD, mask, gqa)
        q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHD))
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2)
    if backend == "flex":
        assert isinstance(mask, BlockMask), "flex attention needs a BlockMask from build_attention_mask"
        q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHD))
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa).transpose(1, 2)
    if backend == "flash":
        fa = _flash_attn()
        if mask is None:
            return fa.flash_attn_func(q_BSHD, k_BSHD, v_BSHD, causal=True)
        assert isinstance(mask, VarlenInfo), "flash attention needs VarlenInfo for packed rows"
        b, s = q_BSHD.shape[:2]
        out = fa.flash_attn_varlen_func(
            q_BSHD.flatten(0, 1),
            k_BSHD.flatten(0, 1),
            v_BSHD.flatten(0, 1),
            mask.cu_seqlens,
            mask.cu_seqlens,
            mask.max_seqlen,
            mask.max_seqlen,
            causal=True,
        )
        return out.unflatten(0, (b, s))
    raise ValueError(f"unknown attn_backend {backend!r} (expected 'sdpa', 'flex' or 'flash')")
