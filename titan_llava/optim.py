"""AdamW with per-part parameter groups (llm / vision / projector) and the HF-style warmup + cosine
learning-rate schedule (a LambdaLR, so it is Stateful for checkpoints).
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

logger = logging.getLogger(__name__)

# Parameter-name prefixes of each trainable part of LlavaNext (contracts: state_dict keys).
PART_PREFIXES: dict[str, tuple[str, ...]] = {
    "llm": ("language_model.",),
    "vision": ("vision_tower.",),
    "projector": ("projector.", "image_newline"),
}


def part_of(param_name: str) -> str:
    """Which part ("llm" | "vision" | "projector") a LlavaNext parameter belongs to."""
    for part, prefixes in PART_PREFIXES.items():
        if param_name.startswith(prefixes):
            return part
    raise AssertionError(f"parameter {param_name!r} belongs to no known model part")


def count_parameters(model: nn.Module) -> dict[str, dict[str, int]]:
    """{part: {"trainable": n, "frozen": n}} over the full (unsharded) parameter shapes."""
    counts = {part: {"trainable": 0, "frozen": 0} for part in PART_PREFIXES}
    for name, p in model.named_parameters():
        counts[part_of(name)]["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


def log_parameter_counts(model: nn.Module, replicated_frozen: bool) -> None:
    """Log each part's trainable and frozen parameter counts; with `replicated_frozen` (frozen
    parameters whole on every rank, `parallelism.replicate_frozen`) also their size per rank."""
    from torch.distributed.tensor import DTensor

    for part, c in count_parameters(model).items():
        logger.info(f"{part:>9}: {c['trainable']:,} trainable, {c['frozen']:,} frozen parameters")
    if replicated_frozen:
        whole = [p for p in model.parameters() if not isinstance(p, DTensor)]
        gib = sum(p.numel() * p.element_size() for p in whole) / 2**30
        logger.info(
            f"parallelism.replicate_frozen: {sum(p.numel() for p in whole):,} frozen "
            f"parameters ({gib:.2f} GiB) whole on every rank, not sharded"
        )


def set_trainable(model: nn.Module, trainable: list[str]) -> None:
    """Freeze every part not listed in `trainable` (apply BEFORE sharding so frozen parameters
    never get gradients, reduce-scatters or optimizer state)."""
    for name, param in model.named_parameters():
        param.requires_grad_(part_of(name) in trainable)


def _is_norm(module: nn.Module) -> bool:
    # HF Trainer excludes LayerNorm and RMSNorm weights (its ALL_LAYERNORM_LAYERS / name rule);
    # our norms are nn.LayerNorm / nn.RMSNorm or a class named *Norm.
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names that get no weight decay, as the reference (HF Trainer): biases and the weights of
    LayerNorm/RMSNorm modules. Embeddings (token, class, position) and image_newline ARE decayed."""
    names = set()
    for mod_name, module in model.named_modules():
        norm = _is_norm(module)
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if norm or p_name == "bias":
                names.add(full)
    return names


def build_param_groups(model: nn.Module, lr_for, weight_decay: float) -> list[dict]:
    """One group per (part, decay) with the part's lr; frozen parameters are left out. Each group
    carries a "name" ("llm", "llm_no_decay", ...) for logging."""
    no_decay = no_decay_parameter_names(model)
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        buckets.setdefault((part_of(name), name not in no_decay), []).append(param)
    groups = []
    for part in PART_PREFIXES:
        for decay in (True, False):
            params = buckets.get((part, decay))
            if params:
                groups.append(
                    {
                        "name": part if decay else f"{part}_no_decay",
                        "params": params,
                        "lr": lr_for(part),
                        "weight_decay": weight_decay if decay else 0.0,
                    }
                )
    return groups


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model` with `cfg` (JobConfig) [optimizer] settings.
    Call after set_trainable and after sharding (parameters may be DTensors)."""
    o = cfg.optimizer
    if o.name != "AdamW":
        raise ValueError(f"optimizer.name: only 'AdamW' is supported, got {o.name!r}")
    groups = build_param_groups(model, cfg.lr_for, o.weight_decay)
    if not groups:
        raise ValueError(f"training.trainable {cfg.training.trainable}: no trainable parameters")
    on_cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])
    impl = o.implementation
    if impl == "auto":
        impl = "fused" if on_cuda else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, **kwargs)


def warmup_cosine_factor(
    step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """lr multiplier at scheduler step `step` (0 = the first optimizer step). Same arithmetic as HF
    get_cosine_schedule_with_warmup (whose first step has lr 0), optionally floored at min_lr_ratio."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if min_lr_ratio == 0.0:
        return cosine
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg, total_steps: int | None = None
) -> LambdaLR:
    """Linear warmup (cfg.warmup_steps(total)) then cosine decay, the same factor for every group.
    Step it once after every optimizer.step(); state_dict()/load_state_dict() for checkpoints."""
    total = cfg.training.steps if total_steps is None else total_steps
    if total <= 0:
        raise ValueError(f"training.steps must be resolved to > 0 before the scheduler, got {total}")
    fn = functools.partial(
        warmup_cosine_factor,
        warmup_steps=cfg.warmup_steps(total),
        total_steps=total,
        min_lr_ratio=cfg.lr_scheduler.min_lr_ratio,
    )
    return LambdaLR(optimizer, fn)
