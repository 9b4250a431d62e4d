"""model.flash_attention_impl: the start-up check (the model's CPU route for packed rows passes;
broken routes fail, naming what differs), and the trainer's activation call (what it refuses,
what it asks torch for, the check it runs). The FA3/FA4 kernels themselves need a GPU and their
packages: run on an H100 in round 8 (benchmarks/README.md), not here. "auto" (what the 7B
configs ship): FA4 only where it applies and was measured, else torch's kernel, saying why."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from tests.train.utils import run_train
from titan_llava.models import fa4_compat, flash_impl
from titan_llava.models.args import VicunaArgs
from titan_llava.models.attention import (
    VarlenInfo,
    _torch_varlen_attn,
    _torch_varlen_causal,
    build_attention_mask,
    causal_attention,
)


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
        fa4_compat.calls["forward"] += 1  # as the FA4 kernels do when the check reaches them
        fa4_compat.calls["backward"] += 1
        return {"out": 1e-3, "dq": 2e-3, "dk": 2e-3, "dv": 1e-3}

    with caplog.at_level("INFO", logger="titan_llava.models.flash_impl"):
        flash_impl.activate("FA4", "sdpa", LLM, CUDA, BF16, check=check)
    assert on_cuda["activated"] == ["FA4"]
    assert on_cuda["checked"] == [(CUDA, BF16, 4, 16, "model.flash_attention_impl 'FA4'")]
    # torch's "FA4" entry now activates this project's kernels, not torch's own glue
    assert on_cuda["registry"]._FLASH_ATTENTION_IMPLS["FA4"] is fa4_compat.register
    assert "start-up check against fp32 SDPA passed" in caplog.text


def test_an_impl_this_torch_lacks_is_refused(on_cuda, monkeypatch):
    monkeypatch.setattr(flash_impl, "available_impls", lambda: ["FA4"])
    with pytest.raises(ValueError, match=r"this torch .* offers \['FA4'\]"):
        flash_impl.activate("FA3", "sdpa", LLM, CUDA, BF16, check=_fail_check)
    assert on_cuda["activated"] == []


@pytest.mark.parametrize("impl, module, match", [
    ("FA3", "flash_attn_interface", "Hopper build installed"),
    ("FA4", "flash_attn.cute", "pip install --pre flash-attn-4"),
])
def test_a_missing_package_says_what_to_install(monkeypatch, torch_registry, impl, module, match):
    """torch's own registry (not stood in for); the package is not installed here."""
    if impl not in flash_impl.available_impls():
        pytest.skip(f"this torch has no {impl} in its flash registry")
    try:
        importlib.import_module(module)
        pytest.skip(f"{module} is installed here")
    except ImportError:
        pass
    monkeypatch.setattr(flash_impl, "torch_varlen_usable", lambda device, dtype, gqa: True)
    with pytest.raises(RuntimeError, match=match) as e:
        flash_impl.activate(impl, "sdpa", LLM, CUDA, BF16, check=_fail_check)
    assert f"No module named '{module.split('.')[0]}" in str(e.value)


def test_a_failed_check_stops_the_run(on_cuda):
    def check(device, dtype, n_heads, head_dim, label):
        raise RuntimeError(f"{label} failed its start-up check: dk differs by 0.5")

    with pytest.raises(RuntimeError, match="dk differs"):
        flash_impl.activate("FA3", "sdpa", LLM, CUDA, BF16, check=check)


# --- "auto": FA4 where it applies and was measured (Hopper), torch's own kernel elsewhere ---


def _counting_check(calls):
    def check(device, dtype, n_heads, head_dim, label):
        calls["checked"].append(label)
        fa4_compat.calls["forward"] += 1  # as the FA4 kernels do when the check reaches them
        fa4_compat.calls["backward"] += 1
        return {"out": 1e-3, "dq": 2e-3, "dk": 2e-3, "dv": 1e-3}
    return check


@pytest.fixture
def hopper(monkeypatch, on_cuda, fake_fa4):
    """A Hopper GPU with flash-attn-4 importable (stood in for)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fake_fa4()
    return on_cuda


def test_auto_picks_fa4_on_hopper_where_it_imports(hopper, caplog):
    with caplog.at_level("INFO", logger="titan_llava.models.flash_impl"):
        got = flash_impl.activate("auto", "sdpa", LLM, CUDA, BF16, check=_counting_check(hopper))
    assert got == "FA4" and hopper["activated"] == ["FA4"]
    assert hopper["checked"] == ["model.flash_attention_impl 'auto' (chose 'FA4')"]
    assert "model.flash_attention_impl 'auto': FA4 (flash-attn-4 imports" in caplog.text
    assert "start-up check against fp32 SDPA passed" in caplog.text


def _no_fa4_module(monkeypatch):
    for name in ("flash_attn", "flash_attn.cute", fa4_compat.FA4_MODULE):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ModuleNotFoundError


def _broken_fa4_module(monkeypatch):
    def interface():
        raise OSError("libcuda.so.1: cannot open shared object file")
    monkeypatch.setattr(fa4_compat, "interface", interface)


@pytest.mark.parametrize("backend, capability, impls, module, why", [
    ("flex", (9, 0), ["FA3", "FA4"], None, "model.attn_backend is 'flex', not 'sdpa'"),
    ("sdpa", (8, 0), ["FA3", "FA4"], None, "compute capability is 8.0"),
    ("sdpa", (10, 0), ["FA3", "FA4"], None, "compute capability is 10.0"),
    ("sdpa", (9, 0), ["FA3"], None, "has no FA4 in its flash registry"),
    ("sdpa", (9, 0), ["FA3", "FA4"], _no_fa4_module, "flash-attn-4 is not installed"),
    ("sdpa", (9, 0), ["FA3", "FA4"], _broken_fa4_module,
     "flash-attn-4 does not import (OSError: libcuda.so.1"),
])
def test_auto_falls_back_to_torchs_kernel_and_says_why(hopper, monkeypatch, caplog, backend,
                                                      capability, impls, module, why):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(flash_impl, "available_impls", lambda: impls)
    if module is not None:
        module(monkeypatch)
    with caplog.at_level("INFO", logger="titan_llava.models.flash_impl"):
        got = flash_impl.activate("auto", backend, LLM, CUDA, BF16, check=_fail_check)
    assert got == "" and hopper["activated"] == []
    assert "model.flash_attention_impl 'auto': torch's own flash kernel" in caplog.text
    assert why in caplog.text


def test_auto_on_this_cpu_is_torchs_kernel(caplog):
    with caplog.at_level("INFO", logger="titan_llava.models.flash_impl"):
        got = flash_impl.activate("auto", "sdpa", LLM, torch.device("cpu"), BF16, check=_fail_check)
    assert got == ""
    assert "packed rows do not run on torch's varlen kernel here (cpu" in caplog.text


def test_auto_never_hides_a_failing_fa4(hopper):
    """Where "auto" chose FA4 and its check fails, the run stops (it is not swapped silently
    for torch's kernel: the installed package is broken), naming what was asked and chosen."""
    def check(device, dtype, n_heads, head_dim, label):
        raise RuntimeError(f"{label} failed its start-up check: dq differs by 0.4")

    with pytest.raises(RuntimeError,
                       match=r"'auto' \(chose 'FA4'\) failed its start-up check: dq differs"):
        flash_impl.activate("auto", "sdpa", LLM, CUDA, BF16, check=check)


def test_explicit_impls_return_what_is_active(on_cuda):
    assert flash_impl.activate("", "sdpa", LLM, CUDA, BF16, check=_fail_check) == ""
    assert flash_impl.activate("FA3", "sdpa", LLM, CUDA, BF16,
                               check=lambda *a, **k: {"out": 0.0}) == "FA3"


def test_trainer_refuses_it_before_any_work(tmp_path):
    """On this CPU machine the key cannot apply: the run stops with the config-error status
    before the model is built, naming the key; an unknown value fails at config load."""
    proc = run_train(str(tmp_path / "a"), ["--model.flash_attention_impl", "FA3"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.flash_attention_impl 'FA3' needs packed rows on torch's varlen kernel" in proc.stderr
    assert "trainable" not in proc.stderr  # the model's parameter summary never printed
    proc = run_train(str(tmp_path / "b"), ["--model.flash_attention_impl", "FA5"], check=False)
    assert proc.returncode == 2 and "flash_attention_impl" in proc.stderr, proc.stderr[-2000:]


def test_trainer_with_auto_trains_on_torchs_kernel_here(tmp_path):
    """The shipped 7B configs ask for "auto": on this CPU machine the run trains on torch's own
    kernel, and the log says so and why."""
    proc = run_train(str(tmp_path / "run"), ["--model.flash_attention_impl", "auto",
                                             "--training.steps", "2", "--checkpoint.enable", "false"])
    assert ("model.flash_attention_impl 'auto': torch's own flash kernel (packed rows do not run "
            "on torch's varlen kernel here (cpu") in proc.stdout + proc.stderr




# --- FA4: this project's kernels for torch's flash ops, flash-attn-4 stood in for ---


def _fake_fa4_interface(fwd_values: int, bwd_values: int) -> types.ModuleType:
    """`flash_attn.cute.interface` as flash-attn-4 releases shape it: the forward returns out and
    lse ([H, T] for packed rows, [B, H, S] for dense ones) first, then None (2 values up to
    4.0.0b18, 4 from b19, 5 from b33); the backward dq, dk, dv, then the sink's gradient."""
    mod = types.ModuleType(fa4_compat.FA4_MODULE)
    mod.calls = []

    def _flash_attn_fwd(q, k, v, **kwargs):
        mod.calls.append(("fwd", kwargs))
        if kwargs["cu_seqlens_q"] is not None:
            lse = torch.ones(q.shape[1], q.shape[0])
        else:
            lse = torch.ones(q.shape[0], q.shape[2], q.shape[1])
        return (q * 2, lse, None, None, None)[:fwd_values]

    def _flash_attn_bwd(q, k, v, out, dout, lse, **kwargs):
        mod.calls.append(("bwd", kwargs))
        return (q + 1, k + 2, v + 3, None)[:bwd_values]

    mod._flash_attn_fwd, mod._flash_attn_bwd = _flash_attn_fwd, _flash_attn_bwd
    return mod


def _install_fa4(monkeypatch, mod: types.ModuleType) -> types.ModuleType:
    """`mod` importable as flash_attn.cute.interface for the test."""
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = mod
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setitem(sys.modules, fa4_compat.FA4_MODULE, mod)
    return mod


@pytest.fixture
def fake_fa4(monkeypatch):
    def install(fwd_values=5, bwd_values=4):
        return _install_fa4(monkeypatch, _fake_fa4_interface(fwd_values, bwd_values))

    return install


def _packed(tokens=10, heads=2, head_dim=4):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(tokens, heads, head_dim, generator=g) for _ in range(3))
    return q, k, v, torch.tensor([0, 3, tokens], dtype=torch.int32)


def _meta(*tensors):
    return [t.to("meta") if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.parametrize("fwd_values, bwd_values", [(2, 3), (4, 3), (5, 4)])
def test_fa4_kernels_give_torch_what_its_ops_return(fake_fa4, fwd_values, bwd_values):
    """A packed causal row as torch's varlen attention hands it over (window (-1, 0)): flash-
    attention 4 gets unbounded windows as None, the documents' offsets and lengths, the scale;
    torch gets outputs shaped as aten's own meta kernels say, whatever else FA4 returns."""
    mod = fake_fa4(fwd_values, bwd_values)
    q, k, v, cu = _packed()
    args = (q, k, v, cu, cu, 7, 7, 0.0, True, False)
    kw = {"scale": 0.5, "window_size_left": -1, "window_size_right": 0}
    before = dict(fa4_compat.calls)
    got = fa4_compat.flash_forward(*args, **kw)
    want = torch.ops.aten._flash_attention_forward(*_meta(*args), **kw)
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want]
    assert torch.equal(got[0], q * 2) and got[1].is_contiguous()

    grads = fa4_compat.flash_backward(torch.ones_like(q), q, k, v, got[0], got[1], cu, cu, 7, 7,
                                      0.0, True, got[2], got[3], **kw)
    assert torch.equal(grads[0], q + 1) and torch.equal(grads[1], k + 2)
    assert torch.equal(grads[2], v + 3) and len(grads) == 3
    (_, fwd), (_, bwd) = mod.calls
    for given in (fwd, bwd):
        assert given["causal"] is True and given["softmax_scale"] == 0.5
        assert given["window_size_left"] is None and given["window_size_right"] == 0
        assert given["cu_seqlens_q"] is cu and given["cu_seqlens_k"] is cu
        assert given["max_seqlen_q"] == 7 and given["max_seqlen_k"] == 7
    assert fwd["return_lse"] is True
    assert fa4_compat.calls == {"forward": before["forward"] + 1,
                                "backward": before["backward"] + 1}


def test_fa4_kernels_dense_rows(fake_fa4):
    """[B, S, H, D] without offsets (how sdpa's flash path calls the op): no lengths passed."""
    mod = fake_fa4()
    q = torch.randn(2, 5, 3, 4)
    args = (q, q, q, None, None, 5, 5, 0.0, False, False)
    got = fa4_compat.flash_forward(*args)
    want = torch.ops.aten._flash_attention_forward(*_meta(*args))
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want]
    fa4_compat.flash_backward(q, q, q, q, got[0], got[1], torch.empty(0), torch.empty(0), 5, 5,
                              0.0, False, got[2], got[3])
    for _, given in mod.calls:
        assert given["cu_seqlens_q"] is None and given["max_seqlen_q"] is None
        assert given["window_size_left"] is None and given["causal"] is False


@pytest.mark.parametrize("kwargs, named", [
    ({"dropout_p": 0.1}, "dropout"),
    ({"return_debug_mask": True}, "debug_mask"),
    ({"alibi_slopes": torch.ones(2)}, "alibi_slopes"),
    ({"num_splits": 4}, "split_kv"),
])
def test_fa4_kernels_refuse_what_they_do_not_do(fake_fa4, kwargs, named):
    mod = fake_fa4()
    q, k, v, cu = _packed()
    call = {"dropout_p": 0.0, "return_debug_mask": False} | kwargs
    with pytest.raises(RuntimeError, match=f"flash-attention 4 route \\(forward\\): {named} not"):
        fa4_compat.flash_forward(q, k, v, cu, cu, 7, 7, call.pop("dropout_p"),
                                 True, call.pop("return_debug_mask"), **call)
    assert mod.calls == []


def test_fa4_kernels_name_a_result_they_cannot_use(fake_fa4):
    fake_fa4(fwd_values=1)
    q, k, v, cu = _packed()
    with pytest.raises(RuntimeError, match="_flash_attn_fwd returned 1, expected at least 2"):
        fa4_compat.flash_forward(q, k, v, cu, cu, 7, 7, 0.0, True, False)


def _cuda_kernels() -> list[str]:
    return [line for op in fa4_compat.OPS
            for line in torch._C._dispatch_dump_table(f"aten::{op}").splitlines()
            if line.startswith("CUDA")]


def test_fa4_activation_registers_and_restore_removes_the_kernels(fake_fa4, torch_registry):
    """Through torch's real registry: activating "FA4" puts this module's kernels on both ops'
    CUDA key, restoring takes them off again."""
    fake_fa4()
    before = _cuda_kernels()
    flash_impl.activate_torch_impl("FA4")
    assert torch.nn.attention.current_flash_attention_impl() == "FA4"
    active = _cuda_kernels()
    assert len(active) == 2 and all("titan_llava/models/fa4_compat.py" in line for line in active)
    torch.nn.attention.restore_flash_attention_impl()
    import gc

    gc.collect()
    assert _cuda_kernels() == before


def test_fa4_check_must_reach_its_kernels(on_cuda):
    """A check that passes without flash-attention 4's kernels running (torch took another
    route) stops the run: the figures would be torch's own kernel's."""
    def check(device, dtype, n_heads, head_dim, label):
        fa4_compat.calls["forward"] += 1  # the forward ran, the backward did not
        return {"out": 1e-3, "dq": 2e-3, "dk": 2e-3, "dv": 1e-3}

    with pytest.raises(RuntimeError, match="did not run flash-attention 4's kernels"):
        flash_impl.activate("FA4", "sdpa", LLM, CUDA, BF16, check=check)


# --- FA4 end to end on the CPU: torch's varlen attention -> aten's flash ops -> fa4_compat ->
# a stand-in with flash-attention 4's semantics (a reference, not a kernel) ---


def _fa4_allowed(n, causal, left, right):
    """Which keys a query may see in one document, by flash-attention 4's rules (interface.py,
    `_resolve_causal_local_window`): both bounds negative means none; causal sets the right bound
    to 0; any bound makes the mask local unless it is exactly (None, 0), which is causal; a
    local bound of None is unbounded."""
    if left is not None and right is not None and left < 0 and right < 0:
        left = right = None
    if causal:
        right = 0
    local = left is not None or right is not None
    if local and left is None and right == 0:
        causal, local = True, False
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if local:
        if left is not None:
            allowed &= j >= i - left
        if right is not None:
            allowed &= j <= i + right
    return allowed


def _reference_attention(q, k, v, cu, causal, left, right, scale, dout=None):
    """Per document, fp32, with the mask above: out and lse ([H, T]); with `dout`, (dq, dk, dv)
    by the closed form (a backward kernel runs below autograd: no autograd there)."""
    outs, lses, grads = [], [], []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qd, kd, vd = (t[s:e].float().transpose(0, 1) for t in (q, k, v))
        sc = scale or qd.shape[-1] ** -0.5
        scores = (qd @ kd.transpose(1, 2)) * sc
        scores = scores.masked_fill(~_fa4_allowed(e - s, causal, left, right), float("-inf"))
        p = scores.softmax(-1)
        o = p @ vd
        lses.append(torch.logsumexp(scores, -1))
        outs.append(o.transpose(0, 1))
        if dout is not None:
            do = dout[s:e].float().transpose(0, 1)
            ds = p * (do @ vd.transpose(1, 2) - (do * o).sum(-1, keepdim=True))
            grads.append([(ds @ kd) * sc, (ds.transpose(1, 2) @ qd) * sc, p.transpose(1, 2) @ do])
    if dout is not None:
        return tuple(torch.cat([g[i].transpose(0, 1) for g in grads]).to(q.dtype) for i in range(3))
    return torch.cat(outs).to(q.dtype), torch.cat(lses, dim=1)


@pytest.fixture
def fa4_reference(monkeypatch):
    """flash_attn.cute.interface stood in for by the reference, shaped as 4.0.0b36 returns; and
    fa4_compat's kernels on aten's flash ops for the CPU (torch has none there), so that torch's
    own varlen attention op runs through them."""
    mod = types.ModuleType(fa4_compat.FA4_MODULE)
    seen = []

    def fwd(q, k, v, *, cu_seqlens_q, causal, window_size_left, window_size_right,
            softmax_scale, **kw):
        seen.append((causal, window_size_left, window_size_right))
        out, lse = _reference_attention(q, k, v, cu_seqlens_q, causal, window_size_left,
                                        window_size_right, softmax_scale)
        return out, lse, None, None, None

    def bwd(q, k, v, out, dout, lse, *, cu_seqlens_q, causal, window_size_left,
            window_size_right, softmax_scale, **kw):
        return _reference_attention(q, k, v, cu_seqlens_q, causal, window_size_left,
                                    window_size_right, softmax_scale, dout) + (None,)

    mod._flash_attn_fwd, mod._flash_attn_bwd, mod.seen = fwd, bwd, seen
    _install_fa4(monkeypatch, mod)
    lib = torch.library.Library("aten", "IMPL", "CPU")
    lib.impl(fa4_compat.OPS[0], fa4_compat.flash_forward, "CPU")
    lib.impl(fa4_compat.OPS[1], fa4_compat.flash_backward, "CPU")
    yield mod
    lib._destroy()


@pytest.mark.skipif(_torch_varlen_attn is None, reason="torch without varlen attention")
def test_fa4_route_passes_the_trainers_check_through_torchs_varlen_op(fa4_reference):
    """The trainer's start-up check on the model's own packed-row route (torch's varlen op and
    its autograd), with fa4_compat under aten's flash ops: it passes at fp32's tolerance, and
    flash-attention 4 was asked for a causal mask, not the local window -1 that torch's own glue
    would hand it."""
    before = dict(fa4_compat.calls)
    diffs = flash_impl.startup_check(torch.device("cpu"), torch.float32, 4, 16)
    assert max(diffs.values()) < 1e-5, diffs
    assert fa4_compat.calls["forward"] > before["forward"]
    assert fa4_compat.calls["backward"] > before["backward"]
    assert set(fa4_reference.seen) == {(True, None, 0)}


@pytest.mark.skipif(_torch_varlen_attn is None, reason="torch without varlen attention")
def test_fa4_route_under_compile_matches_eager(fa4_reference):
    """The same route inside a compiled function (as in the compiled LLM blocks): the outputs
    and input gradients equal the eager route's."""
    q, k, v, cu = _packed(tokens=40, heads=2, head_dim=8)
    info = VarlenInfo(cu, 37)

    def attn(q, k, v):
        return _torch_varlen_causal(q[None], k[None], v[None], info, False)[0]

    results = []
    for fn in (attn, torch.compile(attn, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves)
        results.append((out, *torch.autograd.grad(out.square().sum(), leaves)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
