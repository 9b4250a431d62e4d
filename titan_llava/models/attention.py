"""Causal self-attention for Vicuna with three backends (SDPA, FlexAttention, flash-attn varlen), all
honouring packed rows: with `document_ids`, a token attends causally and only within its document.
The mask is built once per forward (`build_attention_mask`) and shared by every block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - very old torch
    BlockMask = create_block_mask = flex_attention = None  # type: ignore[assignment]


@dataclass
class VarlenInfo:
    """Document boundaries of the flattened [B*S] token stream, for flash-attn's varlen kernel."""

    cu_seqlens: Tensor  # int32 [n_docs + 1]
    max_seqlen: int


# None: plain causal; Tensor: boolean [B, 1, S, S] (True = may attend); BlockMask: flex; VarlenInfo.
AttentionMask = None | Tensor | BlockMask | VarlenInfo


def _flash_attn():
    try:
        import flash_attn
    except ImportError as e:
        raise ValueError(
            "attn_backend 'flash' needs the flash-attn package (pip install flash-attn); "
            "use attn_backend 'sdpa' or 'flex' instead"
        ) from e
    return flash_attn


def build_attention_mask(
    backend: str, document_ids_BS: Tensor | None, batch: int, seq_len: int, device: torch.device
) -> AttentionMask:
    """The per-forward mask object for `backend`; `document_ids_BS` None means one document per row.

    Tokens of the same document must be contiguous within a row (packing guarantees it). Padding may
    carry any id: every token always sees itself, so no softmax row is ever empty (no NaN).
    """
    if backend == "sdpa":
        if document_ids_BS is None:
            return None
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
        flat = document_ids_BS.reshape(-1)
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        starts[::seq_len] = True  # a new row always starts a new sequence
        # One host sync per forward (outside the blocks): flash-attn needs max_seqlen as an int.
        idx = torch.nonzero(starts).flatten()
        cu = torch.cat([idx, idx.new_tensor([flat.numel()])]).to(torch.int32)
        return VarlenInfo(cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max().item()))
    raise ValueError(f"unknown attn_backend {backend!r} (expected 'sdpa', 'flex' or 'flash')")


def causal_attention(
    q_BSHD: Tensor, k_BSHD: Tensor, v_BSHD: Tensor, mask: AttentionMask, backend: str
) -> Tensor:
    """Causal (optionally document-confined) attention; k/v may have fewer heads (GQA).

    Returns [B, S, H, D] with the default 1/sqrt(D) scale.
    """
    gqa = k_BSHD.shape[2] != q_BSHD.shape[2]
    if backend == "sdpa":
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
