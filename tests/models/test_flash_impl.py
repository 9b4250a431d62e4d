"""model.flash_attention_impl: the start-up check (the model's CPU route for packed rows passes;
broken routes fail, naming what differs), and the trainer's activation call (what it refuses,
what it asks torch for, the check it runs). The FA3/FA4 kernels themselves need a GPU and their
packages: not run here (benchmarks/README.md, session 9)."""

from __future__ import annotations

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
def on_cuda(monkeypatch):
    """Stand-ins for what needs a GPU: the varlen route usable, torch's registry."""
    calls = {"activated": [], "checked": []}
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
