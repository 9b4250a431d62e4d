"""Which architecture a run builds: from Hugging Face config.json files, from the earlier run whose
checkpoint it starts from (model_args.json), or from a named flavor; plus the HF-directory rule
of `checkpoint.initial_load_path`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import replace

from titan_llava.checkpoint_io import find_run_file
from titan_llava.config import JobConfig
from titan_llava.models.args import (
    LLAVA_FLAVORS,
    LlavaNextArgs,
    llava_args_from_dict,
    llava_args_to_dict,
)

logger = logging.getLogger("titan_llava")

MODEL_ARGS_FILE = "model_args.json"  # the run's architecture, beside its config.json


def earlier_run_model_args(cfg: JobConfig) -> tuple[LlavaNextArgs, str] | None:
    """The architecture recorded by the run whose DCP checkpoint `checkpoint.initial_load_path`
    points at (stage 1 -> stage 2), with the file it came from; None when there is none."""
    ck = cfg.checkpoint
    if not ck.initial_load_path or ck.initial_load_in_hf:
        return None
    path = find_run_file(ck.initial_load_path, MODEL_ARGS_FILE)
    if path is None:
        return None
    with open(path) as f:
        return llava_args_from_dict(json.load(f), where=path), path


def resolve_model_args(cfg: JobConfig) -> LlavaNextArgs:
    """The architecture, so the user never repeats dimensions: from Hugging Face config.json files
    when starting from HF weights; from the earlier run's model_args.json when starting from its
    DCP checkpoint; else the named flavor. [model] settings apply on top; grid_pinpoints and
    image_aspect_ratio only where set (pinpoints must then match those of a checkpoint that has
    its own; another aspect-ratio mode than the checkpoint's is used with a warning)."""
    ck = cfg.checkpoint
    earlier = earlier_run_model_args(cfg)
    source = None  # what records the pinpoints and image mode the starting weights were trained with
    if ck.initial_load_in_hf:
        from titan_llava.hf.loading import args_from_hf

        dirs = hf_dirs(ck.initial_load_path)
        args = args_from_hf(**dirs)
        if "llava_dir" in dirs:
            source = f"{dirs['llava_dir']}'s config.json"
    elif earlier is not None:
        args, source = earlier
    else:
        args = copy.deepcopy(LLAVA_FLAVORS[cfg.model.flavor])
    pinpoints = list(args.grid_pinpoints)
    if cfg.model.grid_pinpoints is not None:
        asked = [(int(w), int(h)) for w, h in cfg.model.grid_pinpoints]
        # The same candidates in another order pass: Hugging Face stores LLaVA's (w, h) list as
        # (h, w), so a released checkpoint lists these five transposed; the order set here is used.
        if source is not None and sorted(asked) != sorted(pinpoints):
            raise ValueError(
                f"model.grid_pinpoints {asked} differ from those the starting checkpoint was "
                f"trained with ({source}: {pinpoints}); leave model.grid_pinpoints unset to use them"
            )
        pinpoints = asked
    aspect = args.image_aspect_ratio  # the starting checkpoint's (HF LlavaNext: anyres) or the flavor's
    if cfg.model.image_aspect_ratio is not None:
        if source is not None and cfg.model.image_aspect_ratio != aspect:
            logger.warning(
                "model.image_aspect_ratio = %r, but the starting checkpoint was trained with %r (%s): "
                "images are preprocessed and tokenised differently from then on",
                cfg.model.image_aspect_ratio, aspect, source,
            )
        aspect = cfg.model.image_aspect_ratio
    return replace(
        args, attn_backend=cfg.model.attn_backend, image_aspect_ratio=aspect, grid_pinpoints=pinpoints
    )


def hf_dirs(initial_load_path: str) -> dict[str, str]:
    """checkpoint.initial_load_path with initial_load_in_hf: one LlavaNext directory, or
    "LLM_DIR,CLIP_DIR" (a Llama/Vicuna directory and a CLIP directory)."""
    parts = [p.strip() for p in initial_load_path.split(",") if p.strip()]
    if len(parts) == 1:
        return {"llava_dir": parts[0]}
    if len(parts) == 2:
        return {"llm_dir": parts[0], "clip_dir": parts[1]}
    raise ValueError(
        "checkpoint.initial_load_path: expected one LlavaNext directory or 'LLM_DIR,CLIP_DIR', "
        f"got {initial_load_path!r}"
    )


def save_run_config(cfg: JobConfig, args: LlavaNextArgs) -> str:
    """Write the resolved config (config.json) and architecture (model_args.json) into the dump
    folder, where resume and export find them; returns a line saying so."""
    path = cfg.save()
    with open(os.path.join(cfg.job.dump_folder, MODEL_ARGS_FILE), "w") as f:
        json.dump(llava_args_to_dict(args), f, indent=2)
    return f"resolved config and architecture written to {path}, {MODEL_ARGS_FILE}"
