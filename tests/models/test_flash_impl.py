"""model.flash_attention_impl: the start-up check (the model's CPU route for packed rows passes;
broken routes fail, naming what differs), and the trainer's activation call (what it refuses,
what it asks torch for, the check it runs). The FA3/FA4 kernels themselves need a GPU and their
packages: not run here (benchmarks/README.md, session 9)."""

from __future__ import annotations

import importlib
import inspect
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from tests.train.utils import run_train
from titan_llava.models import flash_impl
from titan_llava.models.args import VicunaArgs
from titan_llava.models.attention import build_attention_mask, causal_attention


def _doc_ids(info) -> torch.Tensor:
    lens = (info.cu_seqlens[1:] - info.cu_seqlens[:-1]).tolist()
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])


def cpu_route(q, k, v, info):
    """The model's CPU route for packed rows: SDPA with the dense document mask."""
    docs = _doc_ids(info)
    mask = build_attention_mask("sdpa", docs[None], 1, q.shape[0], q.device, dtype=q.dtype)
    return causal_attention(q[None], k[None], v[None], mask, "sdpa", gqa=False)[0]


def merged_documents(q, k, v, info):
    """Causal over the whole row: documents see each other."""
    return causal_attention(q[None], k[None], v[None], None, "sdpa", gqa=False)[0]


def no_causal_mask(q, k, v, info):
    """Confined to documents, but bidirectional inside them."""
    docs = _doc_ids(info)
    same = docs[:, None] == docs[None, :]
    qt, kt, vt = (t.transpose(0, 1) for t in (q, k, v))
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=same).transpose(0, 1)


class _GradOff(torch.autograd.Function):
    """Identity forward; the backward scales the gradient (a wrong kernel backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def wrong_k_gradient(q, k, v, info):
    return cpu_route(q, _GradOff.apply(k), v, info)


def raises(q, k, v, info):
    raise RuntimeError("no kernel image is available")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_route_passes(dtype):
    diffs = flash_impl.startup_check(torch.device("cpu"), dtype, 4, 16, attn=cpu_route)
    assert set(diffs) == {"out", "dq", "dk", "dv"}
    assert max(diffs.values()) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize(
    "route, named, clean",
    [
        (merged_documents, {"out", "dq", "dk", "dv"}, set()),
        (no_causal_mask, {"out", "dq", "dk", "dv"}, set()),
        (wrong_k_gradient, {"dk"}, {"out", "dq", "dv"}),
    ],
)
def test_broken_routes_fail_naming_what_differs(route, named, clean):
    with pytest.raises(RuntimeError, match="failed its start-up check") as e:
        flash_impl.startup_check(torch.device("cpu"), torch.bfloat16, 4, 16, attn=route,
                                 label="model.flash_attention_impl 'FA3'")
    text = str(e.value)
    assert text.startswith("model.flash_attention_impl 'FA3' failed")
    for name in named:
        assert f"{name} differs by" in text
    for name in clean:
        assert f"{name} differs" not in text


def test_a_kernel_that_raises_is_the_checks_error():
    with pytest.raises(RuntimeError, match="running it raised RuntimeError: no kernel image"):
        flash_impl.startup_check(torch.device("cpu"), torch.bfloat16, 4, 16, attn=raises)


LLM = VicunaArgs(dim=64, n_heads=4, n_layers=1, vocab_size=100, hidden_dim=128)
CUDA, BF16 = torch.device("cuda"), torch.bfloat16


def _fail_check(*a, **k):
    raise AssertionError("the check must not run")


def test_empty_impl_does_nothing():
    flash_impl.activate("", "flex", LLM, torch.device("cpu"), torch.float32, check=_fail_check)


@pytest.mark.parametrize(
    "backend, device, dtype, match",
    [
        ("flex", CUDA, BF16, "applies to model.attn_backend 'sdpa'"),
        ("sdpa", torch.device("cpu"), BF16, "needs packed rows on torch's varlen kernel"),
        ("sdpa", CUDA, torch.float32, "needs packed rows on torch's varlen kernel"),
    ],
)
def test_refused_where_it_cannot_apply(backend, device, dtype, match):
    with pytest.raises(ValueError, match=match):
        flash_impl.activate("FA3", backend, LLM, device, dtype, check=_fail_check)


@pytest.fixture
def torch_registry():
    """torch's flash registry as it was, afterwards (activating FA4 re-points its entry)."""
    registry = pytest.importorskip("torch.nn.attention._registry")
    impls = dict(registry._FLASH_ATTENTION_IMPLS)
    yield registry
    registry.restore_flash_attention_impl(_raise_warn=False)
    registry._FLASH_ATTENTION_IMPLS.clear()
    registry._FLASH_ATTENTION_IMPLS.update(impls)


@pytest.fixture
def on_cuda(monkeypatch, torch_registry):
    """Stand-ins for what needs a GPU: the varlen route usable, torch's registry."""
    calls = {"activated": [], "checked": [], "registry": torch_registry}
    monkeypatch.setattr(flash_impl, "torch_varlen_usable", lambda device, dtype, gqa: True)
    monkeypatch.setattr(flash_impl, "available_impls", lambda: ["FA3", "FA4"])
    monkeypatch.setattr(torch.nn.attention, "activate_flash_attention_impl",
                        lambda impl: calls["activated"].append(impl), raising=False)
    return calls


def test_activates_then_checks_at_the_models_shapes(on_cuda, caplog):
    def check(device, dtype, n_heads, head_dim, label):
        on_cuda["checked"].append((device, dtype, n_heads, head_dim, label))
        return {"out": 1e-3, "dq": 2e-3, "dk": 2e-3, "dv": 1e-3}

    with caplog.at_level("INFO", logger="titan_llava.models.flash_impl"):
        flash_impl.activate("FA4", "sdpa", LLM, CUDA, BF16, check=check)
    assert on_cuda["activated"] == ["FA4"]
    assert on_cuda["checked"] == [(CUDA, BF16, 4, 16, "model.flash_attention_impl 'FA4'")]
    if hasattr(torch.nn.attention, "register_flash_attention_impl"):  # torch >= 2.11
        register = on_cuda["registry"]._FLASH_ATTENTION_IMPLS["FA4"]
        assert register.keywords == {"module_path": flash_impl.FA4_MODULE}  # via fa4_compat
    assert "start-up check against fp32 SDPA passed" in caplog.text


def test_an_impl_this_torch_lacks_is_refused(on_cuda, monkeypatch):
    monkeypatch.setattr(flash_impl, "available_impls", lambda: ["FA4"])
    with pytest.raises(ValueError, match=r"this torch .* offers \['FA4'\]"):
        flash_impl.activate("FA3", "sdpa", LLM, CUDA, BF16, check=_fail_check)
    assert on_cuda["activated"] == []


def test_a_missing_package_says_what_to_install(monkeypatch):
    """torch's own registry (not stood in for): FA3's package is not installed here."""
    if "FA3" not in flash_impl.available_impls():
        pytest.skip("this torch has no FA3 in its flash registry")
    pytest.importorskip("torch.nn.attention._fa3")
    try:
        import flash_attn_interface  # noqa: F401
        pytest.skip("flash_attn_interface is installed here")
    except ImportError:
        pass
    monkeypatch.setattr(flash_impl, "torch_varlen_usable", lambda device, dtype, gqa: True)
    with pytest.raises(RuntimeError, match="Hopper build installed") as e:
        flash_impl.activate("FA3", "sdpa", LLM, CUDA, BF16, check=_fail_check)
    assert "No module named 'flash_attn_interface'" in str(e.value)


def test_a_failed_check_stops_the_run(on_cuda):
    def check(device, dtype, n_heads, head_dim, label):
        raise RuntimeError(f"{label} failed its start-up check: dk differs by 0.5")

    with pytest.raises(RuntimeError, match="dk differs"):
        flash_impl.activate("FA3", "sdpa", LLM, CUDA, BF16, check=check)


def test_trainer_refuses_it_before_any_work(tmp_path):
    """On this CPU machine the key cannot apply: the run stops with the config-error status
    before the model is built, naming the key; an unknown value fails at config load."""
    proc = run_train(str(tmp_path / "a"), ["--model.flash_attention_impl", "FA3"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.flash_attention_impl 'FA3' needs packed rows on torch's varlen kernel" in proc.stderr
    assert "trainable" not in proc.stderr  # the model's parameter summary never printed
    proc = run_train(str(tmp_path / "b"), ["--model.flash_attention_impl", "FA5"], check=False)
    assert proc.returncode == 2 and "flash_attention_impl" in proc.stderr, proc.stderr[-2000:]


# --- FA4 through torch's own glue (torch.nn.attention._fa4), with flash-attn-4 stood in for ---


def _fake_fa4_interface(fwd_values: int, bwd_values: int) -> types.ModuleType:
    """`flash_attn.cute.interface` as flash-attn-4 releases shape it: the forward returns out and
    lse first, then None (2 values up to 4.0.0b18, 4 from b19, 5 from b33); the backward dq, dk,
    dv, then the sink's gradient."""
    mod = types.ModuleType("flash_attn.cute.interface")
    mod.calls = []

    def _flash_attn_fwd(q, k, v, **kwargs):
        mod.calls.append(("fwd", kwargs))
        out = q * 2
        lse = torch.arange(q.shape[0] * q.shape[1], dtype=torch.float32).view(q.shape[0], -1).t()
        return (out, lse, None, None, None)[:fwd_values]

    def _flash_attn_bwd(q, k, v, out, dout, lse, **kwargs):
        mod.calls.append(("bwd", kwargs))
        return (q + 1, k + 2, v + 3, None)[:bwd_values]

    mod._flash_attn_fwd, mod._flash_attn_bwd = _flash_attn_fwd, _flash_attn_bwd
    return mod


@pytest.fixture
def fake_fa4(monkeypatch, torch_registry):
    fa4 = pytest.importorskip("torch.nn.attention._fa4")

    def install(fwd_values=5, bwd_values=4):
        mod = _fake_fa4_interface(fwd_values, bwd_values)
        cute = types.ModuleType("flash_attn.cute")
        cute.interface = mod
        monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
        monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
        monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", mod)
        monkeypatch.delitem(sys.modules, flash_impl.FA4_MODULE, raising=False)
        fa4._fa4_import_module.cache_clear()
        return mod

    yield fa4, install
    fa4._fa4_import_module.cache_clear()
    sys.modules.pop(flash_impl.FA4_MODULE, None)


def _call(fn, **by_name):
    """One of torch's private FA4 helpers, its arguments given by name (their order and set
    differ between torch releases)."""
    params = inspect.signature(fn).parameters
    return fn(**{n: by_name.get(n) for n, p in params.items() if p.default is inspect._empty})


def _packed(tokens=10, heads=2, head_dim=4):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(tokens, heads, head_dim, generator=g) for _ in range(3))
    return q, k, v, torch.tensor([0, 3, tokens], dtype=torch.int32)


def _run_fwd_bwd(fa4):
    q, k, v, cu = _packed()
    common = dict(query=q, key=k, value=v, cu_seq_q=cu, cu_seq_k=cu, max_q=7, max_k=7,
                  scale=0.5, is_causal=True, window_size_left=-1, window_size_right=-1)
    fwd = _call(fa4._fa4_run_forward, **common)
    bwd = _call(fa4._fa4_run_backward, grad_out=torch.ones_like(q), out=fwd[0],
                logsumexp=fwd[1], **common)
    return (q, k, v, cu), fwd, bwd


@pytest.mark.parametrize("fwd_values, bwd_values", [(2, 3), (4, 3), (5, 4)])
def test_fa4_reaches_torch_with_the_values_it_unpacks(fake_fa4, fwd_values, bwd_values):
    """torch's real FA4 glue over flash-attn-4's interface shapes: pointed at fa4_compat, its
    forward and backward get the kernels' out, lse and dq, dk, dv, whatever else they return."""
    fa4, install = fake_fa4
    mod = install(fwd_values, bwd_values)
    assert flash_impl.route_fa4_through_compat()
    torch.nn.attention.activate_flash_attention_impl("FA4")
    assert fa4._FA4_MODULE_PATH == flash_impl.FA4_MODULE
    (q, k, v, cu), (out, lse), (dq, dk, dv) = _run_fwd_bwd(fa4)
    assert torch.equal(out, q * 2)
    assert lse.shape == (2, 10) and lse.is_contiguous()
    assert torch.equal(lse[1], torch.arange(10) * 2 + 1.0)
    assert (torch.equal(dq, q + 1) and torch.equal(dk, k + 2) and torch.equal(dv, v + 3))
    (kind, fwd_kwargs), (kind2, bwd_kwargs) = mod.calls
    assert (kind, kind2) == ("fwd", "bwd")
    assert fwd_kwargs["causal"] and fwd_kwargs["return_lse"] and fwd_kwargs["softmax_scale"] == 0.5
    assert fwd_kwargs["cu_seqlens_q"] is cu and bwd_kwargs["cu_seqlens_k"] is cu


def test_torchs_default_fa4_route_fails_on_newer_releases(fake_fa4):
    """Why fa4_compat exists: torch's glue imports flash_attn.cute.interface directly and cannot
    unpack the forward of flash-attn-4 4.0.0b33 and later."""
    fa4, install = fake_fa4
    install(fwd_values=5, bwd_values=3)
    fa4.register_flash_attention_fa4()  # torch's default module path
    with pytest.raises(ValueError, match="too many values to unpack"):
        _run_fwd_bwd(fa4)


def test_fa4_compat_names_a_result_it_cannot_use(fake_fa4):
    _, install = fake_fa4
    install(fwd_values=1, bwd_values=3)
    fa4_compat = importlib.import_module(flash_impl.FA4_MODULE)
    q, k, v, _ = _packed()
    with pytest.raises(RuntimeError, match=r"_flash_attn_fwd returned 1, expected at least 2"):
        fa4_compat._flash_attn_fwd(q, k, v)


def test_fa4_missing_package_says_what_to_install(monkeypatch, torch_registry):
    """torch's own registry and import, flash-attn-4 not installed here."""
    if "FA4" not in flash_impl.available_impls():
        pytest.skip("this torch has no FA4 in its flash registry")
    fa4 = pytest.importorskip("torch.nn.attention._fa4")
    try:
        import flash_attn.cute  # noqa: F401
        pytest.skip("flash_attn.cute is installed here")
    except ImportError:
        pass
    fa4._fa4_import_module.cache_clear()
    monkeypatch.delitem(sys.modules, flash_impl.FA4_MODULE, raising=False)
    monkeypatch.setattr(flash_impl, "torch_varlen_usable", lambda device, dtype, gqa: True)
    with pytest.raises(RuntimeError, match="pip install --pre flash-attn-4") as e:
        flash_impl.activate("FA4", "sdpa", LLM, CUDA, BF16, check=_fail_check)
    assert "No module named 'flash_attn'" in str(e.value)
