"""attn_backend "cudnn": the custom ops the blocks trace (schema, fake and autograd checked by
torch.library.opcheck), their CPU reference against torch's SDPA, the model and a compiled,
selectively checkpointed block on that route, and the log-sum-exp layouts the CUDA path adapts
to. The cuDNN kernel itself is checked on a GPU by benchmarks/attention_kernel.py."""

import copy

import pytest
import torch
import torch.nn.functional as F

from titan_llava.distributed.parallelize import checkpoint_block, compile_block
from titan_llava.models import cudnn_varlen
from titan_llava.models.args import VicunaArgs
from titan_llava.models.attention import VarlenInfo, build_attention_mask, causal_attention
from titan_llava.models.cudnn_varlen import varlen_causal, varlen_causal_backward
from titan_llava.models.vicuna import Vicuna, VicunaBlock, rope_tables

DOCS = [5, 9, 1, 7]  # a one-token document too


def _qkv(tokens=sum(DOCS), heads=3, dim=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(tokens, heads, dim, generator=g, dtype=dtype).requires_grad_(True)
            for _ in range(3)]


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def test_ops_pass_opcheck():
    q, k, v = _qkv()
    cu = _cu(DOCS)
    torch.library.opcheck(varlen_causal, (q, k, v, cu, max(DOCS)))
    out, lse = varlen_causal(q, k, v, cu, max(DOCS))
    grad = torch.randn_like(out)
    torch.library.opcheck(
        varlen_causal_backward, (grad, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu, max(DOCS))
    )


def test_reference_matches_sdpa_per_document():
    q, k, v = _qkv()
    out, lse = varlen_causal(q, k, v, _cu(DOCS), max(DOCS))
    assert out.shape == q.shape and lse.shape == (3, sum(DOCS)) and lse.dtype == torch.float32
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    start, refs, lses = 0, [], []
    for n in DOCS:
        qd, kd, vd = (t[start : start + n].transpose(0, 1) for t in (q, k, v))
        refs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True).transpose(0, 1))
        scores = (qd @ kd.transpose(1, 2)) / 8**0.5
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        lses.append(torch.logsumexp(scores, -1))
        start += n
    ref = torch.cat(refs)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    assert (out - ref).abs().max() < 1e-5
    assert (lse - torch.cat(lses, 1)).abs().max() < 1e-5
    for g, w in zip(got, want):
        assert w.abs().max() > 0 and (g - w).abs().max() < 1e-5


def test_packed_model_matches_the_dense_mask_route():
    """A Vicuna on attn_backend "cudnn" (CPU: the reference ops) gives the sdpa backend's
    dense-mask logits and input gradients on packed rows, with the same weights."""
    args = VicunaArgs(dim=48, n_layers=2, n_heads=4, vocab_size=64, hidden_dim=96, max_seq_len=64)
    torch.manual_seed(0)
    sdpa = Vicuna(args, "sdpa")
    sdpa.init_weights()
    cudnn = Vicuna(args, "cudnn")
    cudnn.load_state_dict(sdpa.state_dict())
    lens = [[6, 10, 4], [20]]
    doc_ids = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(r)]) for r in lens])
    positions = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in lens])
    h = torch.randn(2, 20, args.dim)
    mask = build_attention_mask("cudnn", doc_ids, 2, 20, h.device)
    assert isinstance(mask, VarlenInfo) and mask.cu_seqlens.tolist() == [0, 6, 16, 20, 40]
    results = []
    for model in (sdpa, cudnn):
        x = h.clone().requires_grad_(True)
        logits = model(h_BSD=x, positions=positions, document_ids=doc_ids)
        logits.square().mean().backward()
        results.append((logits, x.grad))
    (ls, gs), (lc, gc) = results
    assert (lc - ls).abs().max() < 1e-5
    assert (gc - gs).abs().max() < 1e-6 and gs.abs().max() > 0


@pytest.fixture
def fresh_dynamo():
    """Compiled block classes share one code object per class: leave no cache entries behind
    for other tests that count them."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_block_traces_the_op_and_selective_ac_saves_it(monkeypatch, fresh_dynamo):
    """The blocks compile whole (fullgraph) around the op and match eager; selective ("op") AC
    keeps its output, so the backward does not run the attention forward again (full AC does)."""
    args = VicunaArgs(dim=32, n_layers=1, n_heads=2, vocab_size=8, hidden_dim=64, max_seq_len=64)
    torch.manual_seed(0)
    block = VicunaBlock(args, "cudnn")
    block.init_weights(0.02)
    lens = [7, 12, 5]
    cos_t, sin_t = rope_tables(args.head_dim, 64, args.rope_theta)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cos, sin = cos_t[pos], sin_t[pos]
    mask = VarlenInfo(cu_seqlens=_cu(lens), max_seqlen=max(lens))
    h = torch.randn(1, sum(lens), args.dim)

    def run(b):
        x = h.clone().requires_grad_(True)
        out = b(x, cos, sin, mask)
        out.square().sum().backward()
        return out.detach(), x.grad

    ref_out, ref_grad = run(block)
    calls = []
    real = cudnn_varlen._reference
    monkeypatch.setattr(cudnn_varlen, "_reference", lambda *a: calls.append(1) or real(*a))
    for name, op_policy in (("selective", True), ("full", False)):
        b = copy.deepcopy(block)
        checkpoint_block(b, op_policy=op_policy)
        compile_block(b)
        calls.clear()
        out, grad = run(b)
        assert (out - ref_out).abs().max() < 1e-5 and (grad - ref_grad).abs().max() < 1e-5, name
        # One forward call; full AC reruns it in the backward, selective AC keeps its output.
        assert len(calls) == (1 if op_policy else 2), (name, len(calls))
    # Another packing (more documents, another longest one) through the same compiled block.
    lens2 = [3, 15, 2, 4]
    mask2 = VarlenInfo(cu_seqlens=_cu(lens2), max_seqlen=max(lens2))
    h2 = torch.randn(1, sum(lens2), args.dim)
    pos2 = torch.cat([torch.arange(n) for n in lens2])[None]
    with torch.no_grad():
        want = block(h2, cos_t[pos2], sin_t[pos2], mask2)
        got = b(h2, cos_t[pos2], sin_t[pos2], mask2)
    assert (got - want).abs().max() < 1e-5


def test_gqa_is_refused():
    args = VicunaArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=8, hidden_dim=32)
    with pytest.raises(ValueError, match="'cudnn' has no GQA path"):
        Vicuna(args, "cudnn")
    q = torch.zeros(1, 4, 4, 8)
    kv = torch.zeros(1, 4, 2, 8)
    mask = VarlenInfo(cu_seqlens=_cu([4]), max_seqlen=4)
    with pytest.raises(ValueError, match="'cudnn' has no GQA path"):
        causal_attention(q, kv, kv, mask, "cudnn", gqa=True)


@pytest.mark.parametrize("kind", ["TH1", "TH1 heads-major", "HT", "TH"])
def test_log_sum_exp_layouts_round_trip(kind, monkeypatch):
    """Whatever layout cuDNN's forward returns, the op passes [H, T] on and hands the backward
    the forward's own layout back."""
    monkeypatch.setattr(cudnn_varlen, "_CUDNN_LSE_LAYOUT", None)
    t, h = 6, 3
    ht = torch.arange(h * t, dtype=torch.float32).reshape(h, t)
    returned = {
        "TH1": ht.t().contiguous()[..., None],
        "TH1 heads-major": ht.clone().t()[..., None],  # [T, H, 1] over [H, T] storage
        "HT": ht.clone(),
        "TH": ht.t().contiguous(),
    }[kind]
    got = cudnn_varlen._lse_to_heads_tokens(returned, t, h)
    assert torch.equal(got, ht) and got.is_contiguous()
    back = cudnn_varlen._lse_for_cudnn(got)
    assert back.shape == returned.shape and back.stride() == returned.stride()
    assert torch.equal(back, returned)


def test_unexpected_log_sum_exp_shape_names_it():
    with pytest.raises(RuntimeError, match=r"shape \[2, 6\] for 6 tokens x 3 heads"):
        cudnn_varlen._lse_to_heads_tokens(torch.zeros(2, 6), 6, 3)


class _SchemaCheckingAten:
    """Stands in for torch.ops.aten on the CUDA path: binds each call to the real op's schema
    (names and order as this torch declares them), checks what the route passes, and answers
    with the CPU reference, its log-sum-exp in the [T, H, 1] layout some releases return."""

    def __init__(self, cu, max_seqlen):
        self.cu, self.max_seqlen, self.calls = cu, max_seqlen, []
        self.seed, self.offset = torch.tensor([7]), torch.tensor([11])
        self.lse_returned = None

    @staticmethod
    def _bind(op, args, kwargs):
        names = [a.name for a in op.default._schema.arguments]
        assert len(args) <= len(names)
        bound = dict(zip(names, args))
        assert not set(kwargs) & set(bound)
        bound.update(kwargs)
        assert set(bound) <= set(names), set(bound) - set(names)
        return bound

    def _cudnn_attention_forward(self, *args, **kwargs):
        a = self._bind(torch.ops.aten._cudnn_attention_forward, args, kwargs)
        self.calls.append("forward")
        assert a["attn_bias"] is None and a["compute_log_sumexp"] is True
        assert a["dropout_p"] == 0.0 and a["is_causal"] is True and a["return_debug_mask"] is False
        assert a["cum_seq_q"] is self.cu and a["cum_seq_k"] is self.cu
        assert a["max_q"] == a["max_k"] == self.max_seqlen
        out, lse_ht = cudnn_varlen._reference(a["query"], a["key"], a["value"], self.cu)
        self.lse_returned = lse_ht.t().contiguous()[..., None]  # [T, H, 1]
        return (out, self.lse_returned, self.cu, self.cu, self.max_seqlen, self.max_seqlen,
                self.seed, self.offset, torch.empty(0))

    def _cudnn_attention_backward(self, *args, **kwargs):
        a = self._bind(torch.ops.aten._cudnn_attention_backward, args, kwargs)
        self.calls.append("backward")
        assert a["philox_seed"] is self.seed and a["philox_offset"] is self.offset
        assert a["attn_bias"] is None and a["dropout_p"] == 0.0 and a["is_causal"] is True
        assert a["cum_seq_q"] is self.cu and a["cum_seq_k"] is self.cu
        assert a["max_q"] == a["max_k"] == self.max_seqlen
        lse = a["logsumexp"]  # handed back in the layout the forward returned
        assert lse.shape == self.lse_returned.shape and lse.stride() == self.lse_returned.stride()
        assert torch.equal(lse, self.lse_returned)
        lse_ht = lse[..., 0].t()
        return cudnn_varlen._reference_backward(
            a["grad_out"], a["query"], a["key"], a["value"], a["out"], lse_ht, self.cu
        )


def test_real_backward_op_accepts_no_attention_bias():
    """The backward schema declares `Tensor attn_bias` (not optional); the route passes None.
    The real op takes it: on CPU the call gets past argument parsing to the missing kernel."""
    t, lse, empty = torch.zeros(4, 2, 8), torch.zeros(2, 4), torch.empty(0)
    cu = _cu([4])
    with pytest.raises(NotImplementedError, match="'CPU' backend"):
        torch.ops.aten._cudnn_attention_backward(
            t, t, t, t, t, lse, empty, empty, None, cu, cu, 4, 4, 0.0, True
        )


def test_cuda_path_refuses_fp32():
    q, k, v = (t.detach() for t in _qkv())
    with pytest.raises(ValueError, match="bf16/fp16 activations on CUDA, got torch.float32"):
        cudnn_varlen._cudnn_forward(q, k, v, _cu(DOCS), max(DOCS))


def test_cuda_path_calls_the_aten_ops_by_their_schemas(monkeypatch):
    """The CUDA branch's calls, checked against this torch's schemas of
    aten._cudnn_attention_forward / _backward (a stub answers: no GPU here)."""
    q, k, v = (t.detach() for t in _qkv(dtype=torch.bfloat16))
    cu = _cu(DOCS)
    stub = _SchemaCheckingAten(cu, max(DOCS))
    monkeypatch.setattr(cudnn_varlen, "_aten", stub)
    monkeypatch.setattr(cudnn_varlen, "_CUDNN_LSE_LAYOUT", None)
    monkeypatch.setattr(cudnn_varlen, "_CUDNN_PHILOX", None)
    out, lse = cudnn_varlen._cudnn_forward(q, k, v, cu, max(DOCS))
    ref_out, ref_lse = cudnn_varlen._reference(q, k, v, cu)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)  # [H, T] onwards
    grad = torch.randn_like(out)
    grads = cudnn_varlen._cudnn_backward(grad, q, k, v, out, lse, cu, max(DOCS))
    want = cudnn_varlen._reference_backward(grad, q, k, v, ref_out, ref_lse, cu)
    for g, w in zip(grads, want):
        assert torch.equal(g, w)
    assert stub.calls == ["forward", "backward"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_startup_check_passes_on_an_exact_route(dtype):
    diffs = cudnn_varlen.startup_check(torch.device("cpu"), dtype, n_heads=4, head_dim=32)
    assert set(diffs) == {"out", "lse", "dq", "dk", "dv"}
    # The CPU route is exact: what is left is the rounding of its results to `dtype`.
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert max(diffs.values()) < bound, diffs


def _swap_dk_dv(real):
    def backward(*args):
        dq, dk, dv = real(*args)
        return dq, dv, dk
    return backward


def _not_causal(real):
    def scores(qd, kd):
        return qd @ kd.transpose(1, 2) / qd.shape[-1] ** 0.5
    return scores


def _one_document(real):
    def documents(cu_seqlens):
        return [(0, int(cu_seqlens[-1]))]
    return documents


def _lse_shifted(real):
    def reference(*args):
        out, lse = real(*args)
        return out, lse + 0.5
    return reference


@pytest.mark.parametrize(
    "target, breakage, named",
    [
        ("_reference_backward", _swap_dk_dv, ["dk", "dv"]),
        ("_scores", _not_causal, ["out", "lse", "dq", "dk", "dv"]),
        ("_documents", _one_document, ["out", "lse", "dq", "dk", "dv"]),
        ("_reference", _lse_shifted, ["lse", "dq", "dk", "dv"]),  # the backward reads the lse
    ],
)
def test_startup_check_catches_a_wrong_route(monkeypatch, target, breakage, named):
    """The check's reference is torch's SDPA and autograd, not the module's own reference: break
    the route's computation (the op looks these helpers up at call time) and it must say where."""
    monkeypatch.setattr(cudnn_varlen, target, breakage(getattr(cudnn_varlen, target)))
    with pytest.raises(RuntimeError, match="failed its start-up check") as err:
        cudnn_varlen.startup_check(torch.device("cpu"), torch.bfloat16, n_heads=2, head_dim=16)
    msg = str(err.value)
    assert "model.attn_backend 'sdpa'" in msg
    for name in named:
        assert f"{name} differs by" in msg, msg
    for name in {"out", "lse", "dq", "dk", "dv"} - set(named):
        assert f"{name} differs by" not in msg, msg


def test_startup_check_reports_a_kernel_that_raises():
    def op(*args):
        raise NotImplementedError("no kernel for this GPU")

    with pytest.raises(RuntimeError, match=r"failed its start-up check on cpu .*running it raised "
                       r"NotImplementedError: no kernel for this GPU\. Use model.attn_backend 'sdpa'"):
        cudnn_varlen.startup_check(torch.device("cpu"), torch.bfloat16, n_heads=2, head_dim=16, op=op)


def test_startup_check_refuses_fp32_on_cuda_before_touching_the_device():
    with pytest.raises(ValueError, match="bf16/fp16 activations on CUDA"):
        cudnn_varlen.startup_check(torch.device("cuda"), torch.float32, n_heads=2, head_dim=16)


def _route_llm(n_kv_heads=None):
    return VicunaArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=32)


@pytest.mark.parametrize(
    "backend, device, runs", [("cudnn", "cuda", True), ("cudnn", "cpu", False), ("sdpa", "cuda", False)]
)
def test_route_check_runs_the_cudnn_check_on_cuda_only(monkeypatch, backend, device, runs):
    calls = []
    monkeypatch.setattr(
        cudnn_varlen, "startup_check",
        lambda *args: calls.append(args) or dict.fromkeys(("out", "lse", "dq", "dk", "dv"), 0.0),
    )
    cudnn_varlen.check_route(backend, _route_llm(), torch.device(device), torch.bfloat16)
    assert calls == ([(torch.device("cuda"), torch.bfloat16, 4, 64)] if runs else [])


def test_route_check_refuses_gqa_on_the_cudnn_route():
    with pytest.raises(ValueError, match="no GQA path.*4 query heads but 2 key/value heads"):
        cudnn_varlen.check_route("cudnn", _route_llm(n_kv_heads=2), torch.device("cpu"), torch.bfloat16)


def test_trainer_refuses_the_cudnn_route_with_gqa_before_building_the_model(tmp_path):
    """Wiring: a real Trainer (its own process: it starts a process group) on an architecture
    with GQA stops in its set-up with the route's error, before the model exists."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = (
        "import dataclasses, titan_llava.trainer as tr\n"
        "from titan_llava.architecture import LLAVA_FLAVORS\n"
        "from titan_llava.config import load_config\n"
        "a = LLAVA_FLAVORS['debug']\n"
        "LLAVA_FLAVORS['debug'] = dataclasses.replace(a, llm=dataclasses.replace(a.llm, n_kv_heads=2))\n"
        "def built(*args, **kwargs):\n"
        "    raise AssertionError('the model was built before the attention route was checked')\n"
        "tr.LlavaNext = built\n"
        "tr.Trainer(load_config(['--job.config_file', 'train_configs/debug_model.toml', "
        f"'--job.dump_folder', {str(tmp_path)!r}, '--model.attn_backend', 'cudnn']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, "-c", code], cwd=root, env={**env, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert p.returncode != 0
    assert "ValueError: model.attn_backend 'cudnn' has no GQA path" in p.stderr, p.stderr[-3000:]
