"""flash-attention 4 behind torch's flash-attention ops, for the LLM's packed rows.

torch's varlen attention, the sdpa backend's route for packed rows, calls
`aten._flash_attention_forward` / `aten._flash_attention_backward`. `register()` gives both ops
CUDA kernels that call flash-attention 4 (PyPI `flash-attn-4`, module `flash_attn.cute.interface`,
CuTe DSL kernels compiled at first use, Hopper and Blackwell). `flash_impl` registers it as
torch's "FA4" flash implementation (`torch.nn.attention.register_flash_attention_impl`), so that
`activate_flash_attention_impl("FA4")` switches it on and `restore_flash_attention_impl()` off.

Why not torch's own FA4 glue (`torch.nn.attention._fa4`, marked a prototype), read against
torch 2.11 (the GPU machines') and flash-attn-4 4.0.0b36:
- its backward refuses every window size that is not None, and torch's varlen attention always
  passes one ((-1, 0) for causal rows), so every packed-row backward fails;
- its forward hands flash-attention 4 the window -1, flash-attention's "unbounded", which
  flash-attention 4 takes as a local window unless both sides are negative (torch 2.13 maps -1
  to None);
- it unpacks exactly two values from the forward, which returns four from 4.0.0b19 and five
  from 4.0.0b33 (out and lse first each time).

Here a negative bound is None, the kernels' extra return values are dropped, and what this route
does not do (dropout, a debug mask, ALiBi, seqused_k, paged KV, split KV) is refused by name.
`calls` counts the kernels' calls: the trainer's start-up check uses it to prove that the model's
attention really runs here.
"""

from __future__ import annotations

import importlib
import warnings

import torch

FA4_MODULE = "flash_attn.cute.interface"
OPS = ("_flash_attention_forward", "_flash_attention_backward")
calls = {"forward": 0, "backward": 0}


def interface():
    return importlib.import_module(FA4_MODULE)


def _bound(size) -> int | None:
    """aten's window bound (None or negative: unbounded) as flash-attention 4 takes it."""
    return None if size is None or size < 0 else int(size)


def _refuse(op: str, **features) -> None:
    given = [name for name, on in features.items() if on]
    if given:
        raise RuntimeError(f"flash-attention 4 route ({op}): {', '.join(given)} not supported; "
                           "leave model.flash_attention_impl empty for torch's own kernel")


def _first(result, n: int, fn: str) -> tuple:
    if not isinstance(result, tuple) or len(result) < n:
        got = len(result) if isinstance(result, tuple) else type(result).__name__
        raise RuntimeError(f"{FA4_MODULE}.{fn} returned {got}, expected at least {n} values")
    return result[:n]


def flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                  return_debug_mask, *, scale=None, window_size_left=None,
                  window_size_right=None, seqused_k=None, alibi_slopes=None, block_table=None,
                  num_splits=None):
    """aten._flash_attention_forward: 3-D packed rows (cum_seq_q/k) or 4-D [B, S, H, D]."""
    _refuse("forward", dropout=dropout_p != 0.0, debug_mask=return_debug_mask,
            alibi_slopes=alibi_slopes is not None, seqused_k=seqused_k is not None,
            paged_kv=block_table is not None, split_kv=num_splits not in (None, 0, 1))
    varlen = cum_seq_q is not None
    result = interface()._flash_attn_fwd(
        query, key, value,
        cu_seqlens_q=cum_seq_q, cu_seqlens_k=cum_seq_k,
        max_seqlen_q=int(max_q) if varlen else None,
        max_seqlen_k=int(max_k) if varlen else None,
        softmax_scale=scale, causal=is_causal,
        window_size_left=_bound(window_size_left), window_size_right=_bound(window_size_right),
        return_lse=True,
    )
    out, lse = _first(result, 2, "_flash_attn_fwd")
    calls["forward"] += 1
    device = query.device
    # No dropout: the RNG state and offset the backward would take are placeholders, shaped as
    # aten's meta kernel says.
    return (out, lse.contiguous(), torch.zeros(2, dtype=torch.uint64, device=device),
            torch.zeros((), dtype=torch.uint64, device=device),
            torch.empty(0, dtype=query.dtype, device=device))


def flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
                   max_k, dropout_p, is_causal, rng_state, unused, *, scale=None,
                   window_size_left=None, window_size_right=None):
    """aten._flash_attention_backward: (dq, dk, dv)."""
    _refuse("backward", dropout=dropout_p != 0.0)
    varlen = cum_seq_q is not None and cum_seq_q.numel() > 0
    result = interface()._flash_attn_bwd(
        query, key, value, out, grad_out, logsumexp.contiguous(),
        softmax_scale=scale, causal=is_causal,
        window_size_left=_bound(window_size_left), window_size_right=_bound(window_size_right),
        cu_seqlens_q=cum_seq_q if varlen else None, cu_seqlens_k=cum_seq_k if varlen else None,
        max_seqlen_q=int(max_q) if varlen else None, max_seqlen_k=int(max_k) if varlen else None,
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )
    dq, dk, dv = _first(result, 3, "_flash_attn_bwd")
    calls["backward"] += 1
    return dq, dk, dv


class Handle:
    """What torch's registry keeps while FA4 is active; `remove()` drops the kernels."""

    def __init__(self, library):
        self.library = library

    def remove(self) -> None:
        self.library = None  # the Library's finalizer deregisters its kernels


def register() -> Handle:
    """Give torch's two flash ops these CUDA kernels (torch's registry calls this on activation).
    Imports flash-attention 4 first, so that a missing package fails here."""
    interface()
    library = torch.library.Library("aten", "IMPL", "CUDA")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")  # we mean to replace them
        library.impl(OPS[0], flash_forward, "CUDA")
        library.impl(OPS[1], flash_backward, "CUDA")
    return Handle(library)
