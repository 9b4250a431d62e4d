"""Vicuna / Llama-2 decoder: RMSNorm, rotate-half RoPE (as HF Llama), SwiGLU, untied output head.

Runs from token ids or from input embeddings (the LLaVA join), with per-token RoPE positions and
optional packed-row document masking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titan_llava.models.args import ATTN_BACKENDS, VicunaArgs
from titan_llava.models.attention import (
    AttentionMask,
    VarlenInfo,
    build_attention_mask,
    causal_attention,
)


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """cos/sin tables [max_seq_len, head_dim] in fp32, frequency halves duplicated (rotate-half form)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    )
    freqs_SD2 = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)
    emb_SD = torch.cat([freqs_SD2, freqs_SD2], dim=-1)
    return emb_SD.cos(), emb_SD.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BSHD: Tensor, cos_BSD: Tensor, sin_BSD: Tensor) -> Tensor:
    cos = cos_BSD[:, :, None].to(x_BSHD.dtype)
    sin = sin_BSD[:, :, None].to(x_BSHD.dtype)
    return x_BSHD * cos + _rotate_half(x_BSHD) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and cast back before the weight, as HF Llama does (bf16 parity).
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, args: VicunaArgs, attn_backend: str) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.attn_backend = attn_backend
        self.gqa = args.kv_heads != args.n_heads  # a Python bool (static under compile)
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self,
        x_BSD: Tensor,
        cos_BSD: Tensor,
        sin_BSD: Tensor,
        mask: AttentionMask,
        output_index: Tensor | None = None,
    ) -> Tensor:
        """[B, S, D]; with `output_index` (flat indices into B * S) [N, D] at those positions only:
        every position still attends, the output projection runs on the N rows alone."""
        b, s, _ = x_BSD.shape
        q = self.wq(x_BSD).view(b, s, self.n_heads, self.head_dim)
        k = self.wk(x_BSD).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.wv(x_BSD).view(b, s, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos_BSD, sin_BSD), apply_rope(k, cos_BSD, sin_BSD)
        out_BSHD = causal_attention(q, k, v, mask, self.attn_backend, gqa=self.gqa)
        out = out_BSHD.reshape(b, s, -1)
        if output_index is not None:
            out = out.flatten(0, 1).index_select(0, output_index)
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class VicunaBlock(nn.Module):
    def __init__(self, args: VicunaArgs, attn_backend: str) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, attn_backend)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(
        self,
        h_BSD: Tensor,
        cos_BSD: Tensor,
        sin_BSD: Tensor,
        mask: AttentionMask,
        output_index: Tensor | None = None,
    ) -> Tensor:
        """[B, S, D]; with `output_index`, [N, D] at those flat positions only (the last block when
        only some positions reach the head: after attention every row is independent, so the
        output projection, residual and feed-forward skip the others)."""
        a = self.attention(self.attention_norm(h_BSD), cos_BSD, sin_BSD, mask, output_index)
        if output_index is not None:
            h_BSD = h_BSD.flatten(0, 1).index_select(0, output_index)
        h_BSD = h_BSD + a
        return h_BSD + self.feed_forward(self.ffn_norm(h_BSD))

    def init_weights(self, std: float) -> None:
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        for lin in (*self.attention.children(), *self.feed_forward.children()):
            nn.init.normal_(lin.weight, mean=0.0, std=std)


class Vicuna(nn.Module):
    def __init__(self, args: VicunaArgs, attn_backend: str = "sdpa") -> None:
        super().__init__()
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {attn_backend!r}")
        self.args = args
        self.attn_backend = attn_backend
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict(
            {str(i): VicunaBlock(args, attn_backend) for i in range(args.n_layers)}
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, std: float = 0.02) -> None:
        """Llama init: every matrix N(0, std), norms 1; rebuilds the RoPE tables in place."""
        with torch.no_grad():
            cos, sin = rope_tables(
                self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, self.rope_cos.device
            )
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        for layer in self.layers.values():
            layer.init_weights(std)
        self.norm.init_weights()
        nn.init.normal_(self.output.weight, mean=0.0, std=std)

    def forward(
        self,
        tokens: Tensor | None = None,
        *,
        h_BSD: Tensor | None = None,
        positions: Tensor | None = None,
        document_ids: Tensor | None = None,
        output_index: Tensor | None = None,
        document_bounds: VarlenInfo | None = None,
    ) -> Tensor:
        """Logits [B, S, V] from token ids [B, S] or input embeddings `h_BSD` (exactly one); with
        `output_index` (flat indices into the B * S positions) logits [N, V] at those positions
        only: the last block after its attention, the final norm and the head run on nothing else.

        positions: RoPE position per token (default arange; packed rows restart at 0 per document);
        document_ids: packed-row document index per token (attention stays within a document);
        document_bounds: the same as `attention.varlen_info(document_ids)`, built on the host (no
        device sync where packed rows run on a varlen kernel).
        """
        if (tokens is None) == (h_BSD is None):
            raise ValueError("Vicuna.forward takes exactly one of tokens or h_BSD")
        if h_BSD is None:
            h_BSD = self.tok_embeddings(tokens)
        b, s, _ = h_BSD.shape
        if positions is None:
            positions = torch.arange(s, device=h_BSD.device).expand(b, s)
        # Gathering by position (no host sync) gives every packed document its own RoPE origin.
        cos_BSD, sin_BSD = self.rope_cos[positions], self.rope_sin[positions]
        mask = build_attention_mask(
            self.attn_backend,
            document_ids,
            b,
            s,
            h_BSD.device,
            dtype=h_BSD.dtype,
            gqa=self.args.kv_heads != self.args.n_heads,
            document_bounds=document_bounds,
        )
        *layers, last = self.layers.values()
        for layer in layers:
            h_BSD = layer(h_BSD, cos_BSD, sin_BSD, mask)
        if output_index is None:
            return self.output(self.norm(last(h_BSD, cos_BSD, sin_BSD, mask)))
        # Only the attention of the last block needs every position.
        h_ND = last(h_BSD, cos_BSD, sin_BSD, mask, output_index)
        return self.output(self.norm(h_ND))
