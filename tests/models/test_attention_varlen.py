"""sdpa's packed-row route to torch's varlen kernel: when it is taken, the document boundaries it
builds, and (with the CUDA-only kernel replaced by a per-document SDPA stand-in) the plumbing gives
the dense-mask logits. The kernel itself is checked on a GPU by benchmarks/varlen_parity.py.
"""

import itertools

import torch
import torch.nn.functional as F

from titan_llava.models import attention
from titan_llava.models.args import VicunaArgs
from titan_llava.models.attention import (
    VarlenInfo,
    build_attention_mask,
    torch_varlen_usable,
)
from titan_llava.models.vicuna import Vicuna

_CUDA = torch.device("cuda")  # a device object only: nothing runs on it here


def test_route_only_on_cuda_half_precision() -> None:
    has_kernel = attention._torch_varlen_attn is not None
    assert torch_varlen_usable(_CUDA, torch.bfloat16) == has_kernel
    assert torch_varlen_usable(_CUDA, torch.float16) == has_kernel
    assert not torch_varlen_usable(_CUDA, torch.float32)
    assert not torch_varlen_usable(torch.device("cpu"), torch.bfloat16)
    assert not torch_varlen_usable(_CUDA, None)
    # On CPU the sdpa backend keeps the dense boolean mask whatever the dtype (tests rely on it).
    ids = torch.tensor([[0, 0, 1]])
    mask = build_attention_mask("sdpa", ids, 1, 3, torch.device("cpu"), dtype=torch.bfloat16)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool


def test_varlen_boundaries_split_documents_and_rows() -> None:
    # Row 0: docs of 2 and 3 tokens + 1 pad (id 7); row 1 starts with the same id as row 0's end.
    ids = torch.tensor([[0, 0, 1, 1, 1, 7], [7, 7, 7, 2, 2, 2]])
    info = attention.varlen_info(ids, 6)
    assert info.cu_seqlens.dtype == torch.int32
    assert info.cu_seqlens.tolist() == [0, 2, 5, 6, 9, 12]
    assert info.max_seqlen == 3


def _segment_sdpa_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
    """Per-document causal SDPA: an independent stand-in for torch's CUDA-only varlen kernel."""
    assert kw.get("window_size", (-1, 0)) == (-1, 0) and kw.get("is_causal", True)
    assert torch.equal(cu_q, cu_k) and max_q == max_k
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    for lo, hi in itertools.pairwise(bounds):
        seg = [t[lo:hi].transpose(0, 1)[None] for t in (q, k, v)]
        out[lo:hi] = F.scaled_dot_product_attention(*seg, is_causal=True)[0].transpose(0, 1)
    return out


def _packed_model_and_rows():
    """A small Vicuna and two packed rows: documents of 5, 4, 3 tokens; 9 tokens + 3 padding."""
    args = VicunaArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, hidden_dim=48, max_seq_len=32)
    model = Vicuna(args).eval()
    model.init_weights(std=0.2)
    tokens = torch.randint(1, 64, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 9 + [-1] * 3])
    positions = torch.tensor([list(range(5)) + list(range(4)) + list(range(3)), list(range(12))])
    return model, tokens, doc_ids, positions


def test_routed_forward_matches_dense_mask(monkeypatch) -> None:
    model, tokens, doc_ids, positions = _packed_model_and_rows()
    with torch.no_grad():
        dense = model(tokens, positions=positions, document_ids=doc_ids)
        monkeypatch.setattr(attention, "_torch_varlen_attn", _segment_sdpa_varlen)
        monkeypatch.setattr(attention, "torch_varlen_usable", lambda device, dtype, gqa=False: True)
        assert isinstance(build_attention_mask("sdpa", doc_ids, 2, 12, tokens.device), VarlenInfo)
        routed = model(tokens, positions=positions, document_ids=doc_ids)
        # Sensitivity: one wrong boundary (docs 0 and 1 merged) changes the later document's logits.
        merged = doc_ids.clone()
        merged[0, 5:9] = 0
        leaky = model(tokens, positions=positions, document_ids=merged)
    assert (routed - dense).abs().max().item() <= 1e-5
    assert (leaky[0, 5:9] - dense[0, 5:9]).abs().max().item() > 1e-3


def test_host_built_document_bounds_replace_the_device_computation(monkeypatch) -> None:
    """The trainer passes varlen_info of the HOST document ids as document_bounds: the varlen route
    uses them as they are (no recomputation, so no device sync) and gives the dense-mask result;
    routes without a varlen kernel ignore them."""
    model, tokens, doc_ids, positions = _packed_model_and_rows()
    bounds = attention.varlen_info(doc_ids, 12)
    with torch.no_grad():
        dense = model(tokens, positions=positions, document_ids=doc_ids)
        ignored = model(tokens, positions=positions, document_ids=doc_ids, document_bounds=bounds)
        monkeypatch.setattr(attention, "_torch_varlen_attn", _segment_sdpa_varlen)
        monkeypatch.setattr(attention, "torch_varlen_usable", lambda device, dtype, gqa=False: True)

        def no_device_computation(*a, **k):
            raise AssertionError("varlen_info recomputed although document_bounds were given")

        monkeypatch.setattr(attention, "varlen_info", no_device_computation)
        routed = model(tokens, positions=positions, document_ids=doc_ids, document_bounds=bounds)
    assert torch.equal(ignored, dense)
    assert (routed - dense).abs().max().item() <= 1e-5


def _segment_sdpa_varlen_gqa(q, k, v, cu_q, cu_k, max_q, max_k, enable_gqa=False, **kw):
    """As _segment_sdpa_varlen, honouring the kernel's enable_gqa (k/v may have fewer heads)."""
    out = torch.empty_like(q)
    for lo, hi in itertools.pairwise(cu_q.tolist()):
        seg = [t[lo:hi].transpose(0, 1)[None] for t in (q, k, v)]
        out[lo:hi] = F.scaled_dot_product_attention(
            *seg, is_causal=True, enable_gqa=enable_gqa
        )[0].transpose(0, 1)
    return out


def test_routed_forward_with_gqa_matches_dense_mask(monkeypatch) -> None:
    """GQA on the varlen route: the kernel is told that k/v have fewer heads."""
    args = VicunaArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48,
                      max_seq_len=32)
    model = Vicuna(args).eval()
    model.init_weights(std=0.2)
    _, tokens, doc_ids, positions = _packed_model_and_rows()
    with torch.no_grad():
        dense = model(tokens, positions=positions, document_ids=doc_ids)
        monkeypatch.setattr(attention, "_torch_varlen_attn", _segment_sdpa_varlen_gqa)
        monkeypatch.setattr(attention, "torch_varlen_usable", lambda device, dtype, gqa=False: True)
        routed = model(tokens, positions=positions, document_ids=doc_ids)
    assert (routed - dense).abs().max().item() <= 1e-5
