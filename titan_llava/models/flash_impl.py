"""An opt-in flash-attention implementation from torch's registry for the LLM's packed rows.

`model.flash_attention_impl = "FA3"` (or "FA4"; "auto" picks FA4 where it applies) asks torch
(>= 2.11, `torch.nn.attention.activate_flash_attention_impl`) to route
`aten._flash_attention_forward` / `_flash_attention_backward` on CUDA to that implementation. Those two ops are what torch's varlen
kernel, the sdpa backend's route for packed rows, calls, so the model is unchanged. The kernels
come from a package torch does not ship: FA3 from flash-attention's Hopper build (module
`flash_attn_interface`, ops `torch.ops.flash_attn_3`, no wheel on PyPI), FA4 from PyPI's
`flash-attn-4` (pre-releases; module `flash_attn.cute`, CuTe DSL kernels compiled at first use,
with `nvidia-cutlass-dsl`). The PyPI names `flash-attn-interface` and `flash-attn-cute` are empty
placeholders, not these. FA4 runs through this project's kernels for torch's flash ops
(`fa4_compat`; torch 2.11's own FA4 glue fails every packed-row backward), and the start-up check
also proves that they ran.

torch marks this registry a prototype, and FA4 is a pre-release (measured on one H100 with
flash-attn-4 4.0.0b36: benchmarks/README.md, round 8). So the trainer first checks the route
once at a small size (`startup_check`), forward and backward, against each document alone through
fp32 SDPA on the CPU (the check that caught cuDNN's wrong ragged gradients in round 7), and stops
before building the model if it is off.
"""

from __future__ import annotations

import itertools
import logging

import torch
import torch.nn.functional as F

from titan_llava.models import fa4_compat
from titan_llava.models.attention import (
    VarlenInfo,
    _torch_varlen_causal,
    torch_varlen_usable,
)

logger = logging.getLogger(__name__)

# Documents of the start-up check: one shorter than a kernel tile, one of a tile, and one that
# spans two 128-token tiles and part of a third, so that tile edges and document starts are met.
CHECK_DOCS = (17, 64, 300)
# Relative to each quantity's largest value. In bf16 a correct flash kernel is within ~5e-3
# (session 8's emulation); the faults the check is for (a wrong mask, a dropped tile, wrong
# gradients) are off by 0.12 or more.
CHECK_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 3e-2}


def available_impls() -> list[str]:
    """The implementations this torch can activate (empty before torch 2.11)."""
    try:
        from torch.nn.attention import list_flash_attention_impls
    except ImportError:
        return []
    return list(list_flash_attention_impls())


def activate_torch_impl(impl: str) -> None:
    """torch's `activate_flash_attention_impl(impl)`, with this project's FA4 kernels
    (`fa4_compat`) registered as "FA4" first. Reroutes torch's flash ops for the whole process;
    no checks (`activate` is the trainer's call)."""
    from torch.nn.attention import (
        activate_flash_attention_impl,
        register_flash_attention_impl,
    )

    if impl == "FA4":
        register_flash_attention_impl("FA4", register_fn=fa4_compat.register)
    activate_flash_attention_impl(impl)


def startup_check(device: torch.device, dtype: torch.dtype, n_heads: int, head_dim: int,
                  attn=None, label: str = "") -> dict[str, float]:
    """Run packed causal attention on `device` once at a small size, forward and backward, and
    compare it with each document alone through fp32 SDPA and autograd on the CPU. Returns the
    relative differences {"out", "dq", "dk", "dv"}; raises RuntimeError naming each one past
    `dtype`'s tolerance, or the error the kernel raised. `attn(q, k, v, info)` on [T, H, D]
    stands in for the model's route (tests)."""
    if attn is None:
        def attn(q, k, v, info):
            return _torch_varlen_causal(q[None], k[None], v[None], info, False)[0]
    g = torch.Generator().manual_seed(0)
    tokens = sum(CHECK_DOCS)
    q, k, v, grad_out = (
        torch.randn(tokens, n_heads, head_dim, generator=g).to(dtype) for _ in range(4)
    )
    cu = torch.tensor([0, *itertools.accumulate(CHECK_DOCS)], dtype=torch.int32)

    leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    outs = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qd, kd, vd = (t[start:end].transpose(0, 1) for t in leaves)
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True).transpose(0, 1))
    ref_out = torch.cat(outs)
    ref = {"out": ref_out.detach()}
    ref.update(zip(("dq", "dk", "dv"), torch.autograd.grad(ref_out, leaves, grad_out.float())))

    where = (f"{label or 'packed attention'} failed its start-up check on {device} ({dtype}, "
             f"{n_heads} heads x {head_dim}, documents of {list(CHECK_DOCS)} tokens)")
    try:
        dev = [t.to(device).requires_grad_(True) for t in (q, k, v)]
        out = attn(*dev, VarlenInfo(cu.to(device), max(CHECK_DOCS)))
        grads = torch.autograd.grad(out, dev, grad_out.to(device))
        got = {n: t.detach().float().cpu() for n, t in zip(("out", "dq", "dk", "dv"), (out, *grads))}
    except Exception as e:
        raise RuntimeError(f"{where}: running it raised {type(e).__name__}: {e}") from e

    diffs, bad = {}, []
    tol = CHECK_TOLERANCE.get(dtype, 1e-4)
    for name, want in ref.items():
        have = got[name]
        if have.shape != want.shape:
            bad.append(f"{name} has shape {list(have.shape)}, expected {list(want.shape)}")
            diffs[name] = float("inf")
            continue
        diffs[name] = ((have - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
        if not diffs[name] <= tol:  # NaN fails too
            bad.append(f"{name} differs by {diffs[name]:.3g} of its largest value (> {tol:g})")
    if bad:
        raise RuntimeError(f"{where} against each document alone through fp32 SDPA: "
                           + "; ".join(bad))
    return diffs


# Where "auto" picks FA4: the compute capabilities it was measured on (H100, round 8 of
# benchmarks/README.md: stage 1 +8.4%, stage 2 +5.1%). FA4 also has Blackwell kernels, not run
# here: set "FA4" explicitly there.
AUTO_FA4_CAPABILITIES = ((9, 0),)


def fa4_importable() -> str:
    """"" if flash-attention 4 (`flash_attn.cute.interface`) imports, else why not."""
    try:
        fa4_compat.interface()
    except ModuleNotFoundError as e:
        return f"flash-attn-4 is not installed ({e})"
    except Exception as e:  # a broken install: said, not raised ("auto" then uses torch's own)
        return f"flash-attn-4 does not import ({type(e).__name__}: {e})"
    return ""


def resolve_auto(attn_backend: str, llm, device: torch.device,
                 dtype: torch.dtype) -> tuple[str, str]:
    """What "auto" means here: ("FA4", why) where it can apply and was measured to pay (the
    sdpa backend's packed rows on torch's varlen kernel, a Hopper GPU, torch's flash registry
    and flash-attn-4 importable), else ("", why not): torch's own flash kernel."""
    if attn_backend != "sdpa":
        return "", f"model.attn_backend is {attn_backend!r}, not 'sdpa'"
    if not torch_varlen_usable(device, dtype, llm.kv_heads != llm.n_heads):
        return "", (f"packed rows do not run on torch's varlen kernel here ({device}, {dtype}, "
                    f"torch {torch.__version__})")
    capability = torch.cuda.get_device_capability(device)
    if capability not in AUTO_FA4_CAPABILITIES:
        return "", (f"the GPU's compute capability is {capability[0]}.{capability[1]}; FA4 was "
                    "measured on Hopper (9.0) only: set 'FA4' to use it here")
    if "FA4" not in available_impls():
        return "", f"this torch ({torch.__version__}) has no FA4 in its flash registry"
    missing = fa4_importable()
    if missing:
        return "", missing
    major, minor = capability
    return "FA4", f"flash-attn-4 imports and the GPU is compute capability {major}.{minor}"


def activate(impl: str, attn_backend: str, llm, device: torch.device, dtype: torch.dtype,
             check=startup_check) -> str:
    """The trainer's one call, before the model is built: activate `impl` ("" = torch's own
    flash kernel, nothing to do; "auto" = `resolve_auto`'s choice, logged) and check it. Returns
    the implementation now active ("" for torch's own). Raises ValueError for a configuration it
    cannot apply and RuntimeError when torch cannot activate it or the check fails (also where
    "auto" chose it: a failing kernel is never replaced silently)."""
    key = f"model.flash_attention_impl {impl!r}"
    if impl == "auto":
        impl, why = resolve_auto(attn_backend, llm, device, dtype)
        logger.info("%s: %s (%s)", key, impl or "torch's own flash kernel", why)
        key = f"{key} (chose {impl!r})"
    if not impl:
        return ""
    if attn_backend != "sdpa":
        raise ValueError(f"{key} applies to model.attn_backend 'sdpa' (torch's varlen kernel), "
                         f"not {attn_backend!r}")
    gqa = llm.kv_heads != llm.n_heads
    if not torch_varlen_usable(device, dtype, gqa):
        raise ValueError(f"{key} needs packed rows on torch's varlen kernel: CUDA, bf16/fp16, "
                         f"torch >= 2.10 (here {device}, {dtype}, torch {torch.__version__})")
    names = available_impls()
    if impl not in names:
        raise ValueError(f"{key}: this torch ({torch.__version__}) offers {names or 'none'}")
    try:
        activate_torch_impl(impl)
    except Exception as e:
        raise RuntimeError(
            f"{key}: torch could not activate it ({type(e).__name__}: {e}). FA3 needs "
            "flash-attention's Hopper build installed (module flash_attn_interface), FA4 the "
            "flash-attn-4 package (pip install --pre flash-attn-4, with nvidia-cutlass-dsl's "
            "libraries for this CUDA: nvidia-cutlass-dsl[cu13] on CUDA 13); or leave the key "
            "empty for torch's own flash kernel."
        ) from e
    before = dict(fa4_compat.calls)
    diffs = check(device, dtype, llm.n_heads, llm.head_dim, label=key)
    if impl == "FA4":
        ran = {k: fa4_compat.calls[k] - before[k] for k in before}
        if not all(ran.values()):
            raise RuntimeError(
                f"{key}: the start-up check passed, but torch's packed-row attention did not run "
                f"flash-attention 4's kernels ({ran}): torch's own kernel would run instead")
    logger.info("%s active; start-up check against fp32 SDPA passed (max relative differences: "
                "%s)", key, ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return impl
