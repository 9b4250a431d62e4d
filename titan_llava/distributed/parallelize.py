"""Apply parallelism to LlavaNext from the outside, in a fixed order: freeze (frozen parameters
stored in their compute dtype) -> activation checkpointing -> per-block torch.compile -> FSDP2 per
block -> FSDP2 on the remaining parts and the root (parts that do not train may instead stay whole
on every rank: replicate_frozen). Every wrapper acts in place (class swap or instance attribute),
so parameter names and state_dict keys never change.
"""

from __future__ import annotations

import types
import warnings
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from titan_llava.optim import set_trainable

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# Ops whose outputs selective ("op") AC keeps: attention (expensive to recompute, small outputs)
# and matmuls; every second mm is still recomputed to bound memory (the torchtitan policy).
_SAC_SAVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._flash_attention_forward.default,
}
try:  # torch's varlen kernel (sdpa's packed rows on CUDA) is a custom op: SAC sees it, not its aten op
    import torch.nn.attention.varlen  # registers the op

    _SAC_SAVE.add(torch.ops.torch_attn._varlen_attn.default)
except (ImportError, AttributeError):  # pragma: no cover - torch < 2.10
    pass


def _op_sac_context(every_mm: bool = False):
    counts: dict[str, int] = defaultdict(int)  # fresh per checkpointed call

    def policy(ctx, func, *args, **kwargs):
        mode = "recompute" if ctx.is_recompute else "forward"
        if not every_mm and func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            counts[mode] += 1
            if counts[mode] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        if func in _SAC_SAVE:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _op_sac_context_every_mm():
    """Selective option "op_all_mm": every matmul and attention output saved; only the cheap
    ops between them (norms, activations, RoPE, residual adds) are recomputed."""
    return _op_sac_context(every_mm=True)


# selective_ac_option -> the per-op policy's context (module-level functions: compiled blocks
# guard on them)
_OP_POLICIES = {"op": _op_sac_context, "op_all_mm": _op_sac_context_every_mm}


class _CheckpointedBlock:
    """Mixin swapped in front of a block's class: its forward runs under non-reentrant activation
    checkpointing. (A wrapper module would add a prefix to every parameter name.)"""

    _ac_op_policy: str = ""  # "" (full), or a key of _OP_POLICIES
    _ac_inner_forward = None  # the block class's own forward (a plain function), set per class

    def forward(self, *args, **kwargs):
        extra = {"context_fn": _OP_POLICIES[self._ac_op_policy]} if self._ac_op_policy else {}
        # The module goes in as an argument of a plain function, not as a bound method: under
        # torch.compile a bound method would make every block instance recompile the graph.
        # No dropout anywhere: no RNG state to preserve.
        return checkpoint(
            type(self)._ac_inner_forward, self, *args,
            use_reentrant=False, preserve_rng_state=False, **extra, **kwargs,
        )


_CHECKPOINTED_CLASSES: dict[type, type] = {}


def _own_code(fn, owner: str):
    """A copy of `fn` with a code object of its own. Dynamo keeps compiled graphs, and counts
    recompiles against its limit, per code object: vision and LLM blocks sharing one checkpointing
    forward would share one cache (and one recompile budget)."""
    code = fn.__code__
    # A distinct object is what matters; the name only helps reading dynamo's logs (3.11+).
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=f"{owner}.forward")
    else:
        code = code.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def checkpoint_block(block: nn.Module, op_policy: str = "") -> None:
    """Turn on activation checkpointing for `block` in place: full, or selective with a per-op
    policy ("op" or "op_all_mm")."""
    if op_policy and op_policy not in _OP_POLICIES:
        raise ValueError(f"unknown per-op AC policy {op_policy!r}: one of {sorted(_OP_POLICIES)}")
    if isinstance(block, _CheckpointedBlock):
        return
    cls = block.__class__
    # One swapped class per block class: compiled graphs guard on the type, so a class per
    # instance would recompile for every block (and hit dynamo's recompile limit).
    if cls not in _CHECKPOINTED_CLASSES:
        name = f"Checkpointed{cls.__name__}"
        _CHECKPOINTED_CLASSES[cls] = type(
            name,
            (_CheckpointedBlock, cls),
            {"_ac_inner_forward": cls.forward, "forward": _own_code(_CheckpointedBlock.forward, name)},
        )
    block.__class__ = _CHECKPOINTED_CLASSES[cls]
    block._ac_op_policy = op_policy


def apply_activation_checkpointing(
    blocks: nn.ModuleDict, mode: str, option: str = "op", without_ac: int = 0
) -> None:
    """mode none | full | selective; selective option "op" / "op_all_mm" (per-op policies) or N
    (every N-th block). The last `without_ac` blocks are left without AC whatever the mode."""
    if not 0 <= without_ac <= len(blocks):
        raise ValueError(f"without_ac must be in [0, {len(blocks)}] (the blocks), got {without_ac}")
    if mode == "none":
        return
    for i, block in enumerate(blocks.values()):
        if i >= len(blocks) - without_ac:
            break
        if mode == "full":
            checkpoint_block(block)
        elif option in _OP_POLICIES:
            checkpoint_block(block, op_policy=option)
        elif i % int(option) == 0:
            checkpoint_block(block)


def compile_block(block: nn.Module, fullgraph: bool = True) -> None:
    """Compile the block's forward in place (instance attribute: the module, its class and its
    parameter names are untouched, and FSDP's hooks stay outside the compiled region). Dynamic
    shapes so varying sequence lengths and tile counts reuse one graph; identical blocks share it.
    fullgraph: a graph break inside the checkpointed forward would leave the whole block eager
    (silently); here it is an error. (Off only for the optional flash-attn package, whose older
    releases call their kernels through pybind functions dynamo cannot trace.)"""
    block.forward = torch.compile(block.forward, dynamic=True, fullgraph=fullgraph)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: str,
    reduce_dtype: str,
    replicate_frozen: bool = False,
    vision_unit: str = "block",
) -> None:
    """FSDP2 (HSDP on a 2-D mesh): each block, then the embeddings, the LLM head, the vision
    stem, the projector, and the root (image_newline). `vision_unit` "tower": the vision tower's
    blocks are not units of their own (the tower is one). `replicate_frozen`: units whose
    parameters are all frozen are left out (plain tensors, whole on every rank; the root ignores
    them), so they are never all-gathered."""
    if vision_unit not in ("block", "tower"):
        raise ValueError(f"parallelism.fsdp_vision_unit must be 'block' or 'tower', got {vision_unit!r}")
    # FSDP2 warns when a wrapped module returns a view (CLIP drops its CLS token by slicing); the
    # warning is about in-place ops on that output, which LlavaNext never does.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype])
    replicated: set[nn.Parameter] = set()

    def shard(modules, **kwargs) -> None:
        params = [p for m in (modules if isinstance(modules, list) else [modules])
                  for p in m.parameters()]
        if replicate_frozen and params and not any(p.requires_grad for p in params):
            replicated.update(params)
            return
        fully_shard(modules, mesh=mesh, mp_policy=mp, **kwargs)

    if vision_unit == "block":
        for block in model.vision_tower.layers.values():
            shard(block)
    llm = model.language_model
    n = len(llm.layers)
    for i, block in enumerate(llm.layers.values()):
        # The last block's parameters are needed again right away by backward: keep them.
        shard(block, reshard_after_forward=i < n - 1)
    shard(llm.tok_embeddings)
    shard([llm.norm, llm.output], reshard_after_forward=False)
    shard(model.vision_tower)
    shard(model.projector)
    # The root always shards (image_newline trains with the projector).
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=replicated or None)


def broadcast_replicated_params(model: nn.Module) -> int:
    """Copy rank 0's value of every parameter that is whole on each rank (not an FSDP2 DTensor:
    replicate_frozen) to all ranks; returns how many. Needed after a random init_weights, whose
    draws need not agree across ranks; weights loaded from files are the same everywhere already."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    plain = [p for p in model.parameters() if not isinstance(p, DTensor)]
    with torch.no_grad():
        for p in plain:
            dist.broadcast(p.data, src=0)
    return len(plain)


def store_frozen_params(model: nn.Module, dtype: torch.dtype) -> int:
    """Re-create every frozen parameter (requires_grad False) of `model` in `dtype`, in place and
    before sharding (on meta this allocates nothing). Returns how many were changed."""
    changed = 0
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.requires_grad and param.dtype != dtype:
                setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))
                changed += 1
    return changed


def parallelize_llava(model: nn.Module, mesh: DeviceMesh | None, cfg) -> nn.Module:
    """Freeze, checkpoint, compile and shard `model` (a LlavaNext, typically on the meta device)
    in place per `cfg` (JobConfig); returns it. mesh None = no FSDP (single process, fp32)."""
    set_trainable(model, cfg.training.trainable)  # before sharding: frozen params get no grads
    if mesh is not None:  # without FSDP everything computes in fp32: keep the frozen parts there
        store_frozen_params(model, _DTYPES[cfg.frozen_dtype()])
    ac = cfg.activation_checkpoint
    towers = {"llm": model.language_model.layers, "vision": model.vision_tower.layers}
    for name, blocks in towers.items():
        if name not in ac.components:
            continue
        # A frozen vision tower runs without autograd (nothing before it trains): checkpointing
        # would save nothing, and inductor refuses checkpoint regions in an inference graph.
        # The LLM always sits before the loss of whatever trains, so it keeps the policy.
        if name == "vision" and not any(p.requires_grad for p in model.vision_tower.parameters()):
            continue
        without_ac = getattr(ac, f"{name}_layers_without_ac")
        apply_activation_checkpointing(blocks, ac.mode, ac.selective_ac_option, without_ac)
    if cfg.compile.enable:
        for name in cfg.compile.components:
            # flash-attn's kernels run only in the LLM; the vision tower always uses SDPA.
            fullgraph = name == "vision" or cfg.model.attn_backend != "flash"
            for block in towers[name].values():
                compile_block(block, fullgraph=fullgraph)
    if mesh is not None:
        apply_fsdp(
            model,
            mesh,
            cfg.training.mixed_precision_param,
            cfg.training.mixed_precision_reduce,
            replicate_frozen=cfg.parallelism.replicate_frozen,
            vision_unit=cfg.parallelism.fsdp_vision_unit,
        )
    return model
