"""Packed rows: a row of several documents (positions restarting at 0, document_ids) gives exactly
the logits of running each document on its own, for the sdpa and flex backends; padding is NaN-free.
"""

import warnings

import pytest
import torch

from titan_llava.models.args import VicunaArgs
from titan_llava.models.attention import build_attention_mask, causal_attention
from titan_llava.models.vicuna import Vicuna

_ARGS = VicunaArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48, max_seq_len=64)


def _packed_batch(doc_lens: list[int], pad: int, vocab: int):
    docs = [torch.randint(1, vocab, (n,)) for n in doc_lens]
    tokens = torch.cat(docs + [torch.zeros(pad, dtype=torch.long)])
    positions = torch.cat([torch.arange(n) for n in doc_lens] + [torch.arange(pad)])
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(doc_lens)] + [torch.full((pad,), -1)])
    return docs, tokens, positions, doc_ids


def _check_packed(backend: str, doc_lens: list[int], pad: int, tol: float) -> None:
    model = Vicuna(_ARGS, attn_backend=backend).eval()
    model.init_weights(std=0.2)
    ref_model = Vicuna(_ARGS, attn_backend="sdpa").eval()
    ref_model.load_state_dict(model.state_dict())
    docs, tokens, positions, doc_ids = _packed_batch(doc_lens, pad, _ARGS.vocab_size)
    # Row 1 is pure padding (one id for the whole row): it must stay finite.
    tokens_BS = torch.stack([tokens, torch.zeros_like(tokens)])
    positions_BS = torch.stack([positions, torch.arange(tokens.numel())])
    doc_ids_BS = torch.stack([doc_ids, torch.full_like(doc_ids, -1)])
    with torch.no_grad():
        packed = model(tokens_BS, positions=positions_BS, document_ids=doc_ids_BS)
    assert torch.isfinite(packed).all()
    start = 0
    for doc in docs:
        with torch.no_grad():
            alone = ref_model(doc[None])[0]  # plain causal, default positions
        diff = (packed[0, start : start + doc.numel()] - alone).abs().max().item()
        assert diff <= tol, f"{backend}: document at {start} differs by {diff}"
        start += doc.numel()
    # Without document masking the later documents would see the earlier ones: the test can fail.
    with torch.no_grad():
        leaky = model(tokens_BS, positions=positions_BS)
    assert (leaky[0, doc_lens[0] :] - packed[0, doc_lens[0] :]).abs().max().item() > 1e-3


def test_packed_documents_sdpa() -> None:
    _check_packed("sdpa", [5, 9, 4], pad=3, tol=1e-5)


def test_packed_documents_flex() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex in eager on CPU warns that it is unfused
        _check_packed("flex", [3, 6, 4], pad=3, tol=1e-5)


def test_sdpa_mask_is_block_diagonal_causal() -> None:
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 7]])
    mask = build_attention_mask("sdpa", doc_ids, 1, 6, torch.device("cpu"))[0, 0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for lo, hi in [(0, 2), (2, 5), (5, 6)]:
        expected[lo:hi, lo:hi] = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
    assert torch.equal(mask, expected)
    assert build_attention_mask("sdpa", None, 1, 6, torch.device("cpu")) is None


def test_causal_attention_gqa_matches_repeated_heads() -> None:
    q = torch.randn(2, 7, 4, 8)
    k, v = torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    got = causal_attention(q, k, v, None, "sdpa")
    k4, v4 = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k4) / 8**0.5
    scores = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v4)
    assert (got - ref).abs().max().item() <= 1e-5


def test_unknown_or_missing_backend_raises() -> None:
    with pytest.raises(ValueError, match="attn_backend"):
        build_attention_mask("xformers", None, 1, 4, torch.device("cpu"))
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="flash-attn"):
            build_attention_mask("flash", None, 1, 4, torch.device("cpu"))
