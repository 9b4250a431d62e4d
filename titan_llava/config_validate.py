"""Validation of a JobConfig: cross-field rules that need no I/O, and input paths. Every error is a
ValueError naming the config key, raised before any work starts (JobConfig.validate calls these).
"""

from __future__ import annotations

import math
import os

from titan_llava.config import TRAINABLE_PARTS, JobConfig
from titan_llava.config_parse import suggest


def validate(cfg: JobConfig, world_size: int = 1) -> None:
    """Cross-field rules that need no I/O. Resolves global_batch_size = -1 in place."""
    from titan_llava.distributed.parallel_dims import ParallelDims

    t, o, s = cfg.training, cfg.optimizer, cfg.lr_scheduler
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    dp = dims.dp_degree
    if t.local_batch_size <= 0:
        raise ValueError(f"training.local_batch_size must be > 0, got {t.local_batch_size}")
    for key in ("init_timeout_seconds", "train_timeout_seconds"):
        if getattr(cfg.parallelism, key) <= 0:
            raise ValueError(f"parallelism.{key} must be > 0, got {getattr(cfg.parallelism, key)}")
    if cfg.parallelism.replicate_frozen and cfg.frozen_dtype() != t.mixed_precision_param:
        raise ValueError(
            "parallelism.replicate_frozen needs frozen parameters stored in the compute dtype: "
            f"training.frozen_param_dtype is {t.frozen_param_dtype!r} but "
            f"training.mixed_precision_param is {t.mixed_precision_param!r} (replicated "
            "parameters are used as stored, FSDP's mixed precision does not cast them)"
        )
    _validate_modality_megabatch(cfg, dp)
    if t.global_batch_size == -1:
        t.global_batch_size = t.local_batch_size * dp
    if t.global_batch_size <= 0 or t.global_batch_size % (t.local_batch_size * dp):
        raise ValueError(
            f"training.global_batch_size ({t.global_batch_size}) must be a positive multiple of "
            f"training.local_batch_size x data-parallel degree ({t.local_batch_size} x {dp})"
        )
    if t.steps == 0 or t.steps < -1:
        raise ValueError(f"training.steps must be > 0 (or -1 = from epochs), got {t.steps}")
    if t.steps == -1 and t.epochs <= 0:
        raise ValueError(f"training.epochs must be > 0 when training.steps = -1, got {t.epochs}")
    if t.steps == -1 and cfg.data.packing:
        raise ValueError(
            "training.steps = -1 (steps from epochs) needs data.packing = false: a packed row "
            "holds a varying number of samples. Set training.steps; `python -m "
            "titan_llava.data.inspect --config <toml> --packing` prints the rows one epoch packs into"
        )
    bad = [p for p in t.trainable if p not in TRAINABLE_PARTS]
    if bad or not t.trainable or len(set(t.trainable)) != len(t.trainable):
        raise ValueError(
            f"training.trainable must be a non-empty list of distinct {list(TRAINABLE_PARTS)}, "
            f"got {t.trainable}"
        )
    for key, v in (
        ("optimizer.lr", o.lr), ("optimizer.llm_lr", o.llm_lr), ("optimizer.vision_lr", o.vision_lr),
        ("optimizer.projector_lr", o.projector_lr), ("optimizer.eps", o.eps),
        ("optimizer.weight_decay", o.weight_decay), ("training.max_norm", t.max_norm),
    ):  # NaN fails every comparison; inf would make the first update non-finite
        if v is not None and not 0 <= v < math.inf:
            raise ValueError(f"{key} must be a finite number >= 0, got {v}")
    if not (0.0 <= o.betas[0] < 1.0 and 0.0 <= o.betas[1] < 1.0):
        raise ValueError(f"optimizer.betas must be in [0, 1), got {o.betas}")
    if not 0 <= cfg.job.seed < 2**63:
        raise ValueError(f"job.seed must be in [0, 2**63), got {cfg.job.seed}")
    if cfg.checkpoint.load_step < -1:
        raise ValueError(
            f"checkpoint.load_step must be -1 (the newest) or a step, got {cfg.checkpoint.load_step}"
        )
    if not 0.0 <= s.warmup_ratio <= 1.0:
        raise ValueError(f"lr_scheduler.warmup_ratio must be in [0, 1], got {s.warmup_ratio}")
    if s.warmup_steps is not None and s.warmup_steps < 0:
        raise ValueError(f"lr_scheduler.warmup_steps must be >= 0, got {s.warmup_steps}")
    if t.steps > 0 and cfg.warmup_steps() > t.steps:
        raise ValueError(
            f"lr_scheduler.warmup_steps ({cfg.warmup_steps()}) exceeds training.steps ({t.steps})"
        )
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        raise ValueError(f"lr_scheduler.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    if cfg.model.image_aspect_ratio in ("anyres", None) and cfg.model.grid_pinpoints is not None:
        if not cfg.model.grid_pinpoints:
            raise ValueError("model.grid_pinpoints must not be empty for image_aspect_ratio anyres")
        for w, h in cfg.model.grid_pinpoints:
            if w <= 0 or h <= 0 or w % 336 or h % 336:
                raise ValueError(
                    f"model.grid_pinpoints entry {(w, h)} is not a positive multiple of 336"
                )
    ac = cfg.activation_checkpoint
    if ac.mode == "selective" and ac.selective_ac_option not in ("op", "op_all_mm"):
        if not (ac.selective_ac_option.isdigit() and int(ac.selective_ac_option) > 0):
            raise ValueError(
                "activation_checkpoint.selective_ac_option must be 'op', 'op_all_mm' or a "
                f"positive integer, got {ac.selective_ac_option!r}"
            )
    for key, components in (
        ("compile.components", cfg.compile.components),
        ("activation_checkpoint.components", ac.components),
    ):
        bad = [c for c in components if c not in ("llm", "vision")]
        if bad:
            raise ValueError(f"{key} may hold 'llm' and 'vision', got {bad}")
    c = cfg.checkpoint
    for key, value, low in (
        ("data.max_seq_len", cfg.data.max_seq_len, 1),
        ("data.num_workers", cfg.data.num_workers, 0),
        ("data.packing_lookahead", cfg.data.packing_lookahead, 1),
        ("checkpoint.interval", c.interval, 1),
        ("checkpoint.keep_latest_k", c.keep_latest_k, 0),
        ("metrics.log_freq", cfg.metrics.log_freq, 1),
        ("activation_checkpoint.llm_layers_without_ac", ac.llm_layers_without_ac, 0),
        ("activation_checkpoint.vision_layers_without_ac", ac.vision_layers_without_ac, 0),
    ):
        if value < low:
            raise ValueError(f"{key} must be >= {low}, got {value}")
    if cfg.data.packing_row_len != -1 and cfg.data.packing_row_len < cfg.data.max_seq_len:
        raise ValueError(
            f"data.packing_row_len ({cfg.data.packing_row_len}) must be -1 or >= data.max_seq_len "
            f"({cfg.data.max_seq_len}): a row must hold the longest sample"
        )
    if c.load_step >= 0 and not c.enable:
        raise ValueError(
            f"checkpoint.load_step = {c.load_step} needs checkpoint.enable = true (with it off, "
            "no checkpoint is loaded); to start from another run's step folder use "
            "checkpoint.initial_load_path"
        )
    if c.initial_load_in_hf and not c.initial_load_path:
        raise ValueError("checkpoint.initial_load_in_hf needs checkpoint.initial_load_path")
    from titan_llava.models.args import LLAVA_FLAVORS

    if not c.initial_load_in_hf and cfg.model.flavor not in LLAVA_FLAVORS:
        raise ValueError(
            f"model.flavor {cfg.model.flavor!r} is not one of {sorted(LLAVA_FLAVORS)}"
            f"{suggest(cfg.model.flavor, LLAVA_FLAVORS)}"
        )


def validate_against_architecture(cfg: JobConfig, args, tokenizer_vocab_size: int) -> None:
    """Rules that need the resolved architecture (`args`: LlavaNextArgs, which may come from
    Hugging Face config.json files): checked before any model or data exists."""
    if tokenizer_vocab_size > args.llm.vocab_size:
        raise ValueError(
            f"model.tokenizer_path: the tokenizer has {tokenizer_vocab_size} pieces but the "
            f"model's vocabulary has {args.llm.vocab_size} rows"
        )
    if cfg.data.max_seq_len > args.llm.max_seq_len:
        raise ValueError(
            f"data.max_seq_len ({cfg.data.max_seq_len}) exceeds the positions the LLM was built "
            f"for ({args.llm.max_seq_len}: its RoPE table, max_position_embeddings in a Hugging "
            "Face config.json); lower data.max_seq_len"
        )
    ac = cfg.activation_checkpoint
    for key, value, blocks in (
        ("llm_layers_without_ac", ac.llm_layers_without_ac, args.llm.n_layers),
        ("vision_layers_without_ac", ac.vision_layers_without_ac, args.vision.n_built_layers),
    ):
        if value > blocks:
            raise ValueError(
                f"activation_checkpoint.{key} ({value}) exceeds the {blocks} blocks the model has"
            )


def validate_paths(cfg: JobConfig) -> None:
    """Check that the input files exist; the error names the config key."""
    checks = [
        ("model.tokenizer_path", cfg.model.tokenizer_path, os.path.isfile),
        ("data.path", cfg.data.path, os.path.isfile),
    ]
    if cfg.data.image_folder is not None:
        checks.append(("data.image_folder", cfg.data.image_folder, os.path.isdir))
    if cfg.checkpoint.initial_load_path:
        for part in cfg.checkpoint.initial_load_path.split(","):
            checks.append(("checkpoint.initial_load_path", part.strip(), os.path.isdir))
    for key, path, exists in checks:
        if not exists(path):
            kind = "directory" if exists is os.path.isdir else "file"
            raise ValueError(f"{key}: {kind} {path!r} does not exist")


def _validate_modality_megabatch(cfg: JobConfig, dp: int) -> None:
    d = cfg.data
    grouped_packing = d.packing and d.group_by_modality_length
    if d.modality_megabatch == -1:
        if grouped_packing:
            raise ValueError(
                "data.group_by_modality_length with data.packing needs data.modality_megabatch: the "
                "samples of one single-modality megabatch (the reference's is its global batch, 128 "
                "in stage 2); training.global_batch_size counts packed rows, not samples"
            )
        return
    if not grouped_packing:
        raise ValueError(
            "data.modality_megabatch applies only with data.packing and "
            "data.group_by_modality_length (without packing the megabatch is "
            "training.global_batch_size, as in the reference): leave it at -1"
        )
    if d.modality_megabatch <= 0 or d.modality_megabatch % dp:
        raise ValueError(
            f"data.modality_megabatch ({d.modality_megabatch}) must be a positive multiple of the "
            f"data-parallel degree ({dp}), so every rank gets the same share of each megabatch"
        )
