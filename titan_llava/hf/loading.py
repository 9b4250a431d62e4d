"""Load Hugging Face safetensors weights into a built (possibly FSDP2-sharded) titan_llava model.

Sources: one LLaVA-NeXT directory (llava-hf or the newer layout), or a Llama/Vicuna directory plus a
CLIP directory (stage 1: projector and image_newline then stay at their init). Tensors stream one at
a time; each rank copies only its own shard. Every check runs before the first tensor is copied.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from titan_llava.hf.config_adapter import (
    clip_vision_args_from_hf,
    llava_next_args_from_hf,
    vicuna_args_from_hf,
)
from titan_llava.hf.safetensors_io import SafetensorsCheckpoint, read_config
from titan_llava.hf.state_dict_adapter import (
    OUR_LLM,
    OUR_NEWLINE,
    OUR_PROJECTOR,
    OUR_VISION,
    UNUSED,
    detect_layout,
    hf_to_ours,
)
from titan_llava.models.args import CLIPVisionArgs, LlavaNextArgs

# Our keys whose HF tensor may carry extra vocab rows (llava-hf pads 32000 -> 32064 with <image>,
# <pad> and alignment rows); we keep the first `vocab_size` rows.
VOCAB_KEYS = (OUR_LLM + "tok_embeddings.weight", OUR_LLM + "output.weight")
_VISION_LAYER_RE = re.compile(r"^vision_tower\.layers\.(\d+)\.")
_EXPECTED_LAYOUTS = {"llava": ("llava", "llava_hf"), "llm": ("llama",), "clip": ("clip",)}


@dataclass
class LoadReport:
    """What a load did. Keys in `missing` are ours; keys in `unused`/`unrecognized` are HF's."""

    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # ours, left at init (allowed parts only)
    unused: list[str] = field(default_factory=list)  # HF keys our model does not use
    unrecognized: list[str] = field(default_factory=list)  # HF keys in no table (strict=False only)
    truncated: dict[str, tuple[int, int]] = field(default_factory=dict)  # ours -> (hf rows, kept)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"loaded {self.loaded} tensors; {len(self.missing)} left at init; "
            f"{len(self.unused)} HF tensors unused; {len(self.unrecognized)} unrecognized"
        )
        for key, (hf_rows, kept) in self.truncated.items():
            text += f"; {key}: kept {kept} of {hf_rows} rows"
        return text


def args_from_hf(
    *,
    llava_dir: str | None = None,
    llm_dir: str | None = None,
    clip_dir: str | None = None,
    select_layer: int = -2,
    vocab_size: int | None = None,
) -> LlavaNextArgs:
    """LlavaNextArgs from a LLaVA-NeXT dir, or from a Llama dir + a CLIP dir (default AnyRes setup).

    `select_layer` applies to the pair form (a LLaVA config carries its own vision_feature_layer).
    `vocab_size` overrides the LLM vocab (e.g. 32000 for the Vicuna tokenizer when the llava-hf
    config says 32064); the loader then keeps the first rows of the embedding and LM head.
    """
    if llava_dir is not None:
        if llm_dir is not None or clip_dir is not None:
            raise ValueError("give either llava_dir or llm_dir + clip_dir, not both")
        args = llava_next_args_from_hf(
            read_config(llava_dir), where=os.path.join(llava_dir, "config.json")
        )
    elif llm_dir is not None and clip_dir is not None:
        args = LlavaNextArgs(
            vision=clip_vision_args_from_hf(
                read_config(clip_dir), select_layer, where=os.path.join(clip_dir, "config.json")
            ),
            llm=vicuna_args_from_hf(
                read_config(llm_dir), where=os.path.join(llm_dir, "config.json")
            ),
        )
    else:
        raise ValueError("args_from_hf needs llava_dir, or both llm_dir and clip_dir")
    if vocab_size is not None:
        args.llm.vocab_size = int(vocab_size)
    return args


def _special_rows_check(directory: str, our_rows: int, hf_rows: int) -> str | None:
    """Verify that vocab rows [our_rows, hf_rows) are special added tokens or alignment padding.

    Uses the tokenizer files shipped with the checkpoint. Raises ValueError when a dropped row is a
    real (non-special) token; returns a note when the directory has no tokenizer metadata.
    """
    special: dict[int, bool] = {}  # added-token id -> is special
    base_size: int | None = None
    tok_cfg = os.path.join(directory, "tokenizer_config.json")
    tok_json = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(tok_cfg):
        with open(tok_cfg) as f:
            for tid, tok in (json.load(f).get("added_tokens_decoder") or {}).items():
                special[int(tid)] = bool(tok.get("special", False))
    if os.path.isfile(tok_json):
        with open(tok_json) as f:
            tj = json.load(f)
        for tok in tj.get("added_tokens") or []:
            special.setdefault(int(tok["id"]), bool(tok.get("special", False)))
        vocab = (tj.get("model") or {}).get("vocab")
        if vocab is not None:
            base_size = len(vocab)
    sp_path = os.path.join(directory, "tokenizer.model")
    if base_size is None and os.path.isfile(sp_path):
        import sentencepiece  # only needed for this check

        base_size = sentencepiece.SentencePieceProcessor(model_file=sp_path).GetPieceSize()
    if not special and base_size is None:
        return (
            f"{directory}: no tokenizer files, could not verify that vocab rows "
            f"{our_rows}..{hf_rows - 1} are special tokens"
        )
    for tid in range(our_rows, hf_rows):
        if tid in special:
            if not special[tid]:
                raise ValueError(
                    f"{directory}: vocab row {tid} is the non-special added token; a model with "
                    f"vocab_size {our_rows} would drop it (raise vocab_size to {hf_rows})"
                )
        elif base_size is not None and tid < base_size:
            raise ValueError(
                f"{directory}: the tokenizer has {base_size} base tokens; a model with vocab_size "
                f"{our_rows} would drop real token rows"
            )
    return None


@dataclass
class _Plan:
    """One HF tensor to copy into one of our parameters."""

    ckpt: SafetensorsCheckpoint
    hf_key: str
    rows: int | None  # read only the first `rows` rows (vocab truncation)


def _target_key(our_key: str, bare_prefix: str | None) -> str:
    # A bare Vicuna / CLIP module (not wrapped in LlavaNext) has its keys without the part prefix.
    if bare_prefix is not None and our_key.startswith(bare_prefix):
        return our_key[len(bare_prefix) :]
    return our_key


def load_hf_weights(
    model: nn.Module,
    *,
    llava_dir: str | None = None,
    llm_dir: str | None = None,
    clip_dir: str | None = None,
    strict: bool = True,
) -> LoadReport:
    """Copy HF weights into `model` in place (parameters may be FSDP2 DTensors).

    `model` is a LlavaNext, or a bare Vicuna (llm_dir only) / CLIP tower (clip_dir only). Errors
    (ValueError): shape mismatch (key and both shapes), our keys missing from the checkpoint(s)
    unless the part may stay at init (projector + image_newline for llm_dir + clip_dir), HF keys
    that belong in the model but have no place in it, and, with `strict`, HF keys in no key table.
    """
    sources: list[tuple[str, str]] = []
    if llava_dir is not None:
        if llm_dir is not None or clip_dir is not None:
            raise ValueError("give either llava_dir or llm_dir/clip_dir, not both")
        sources.append(("llava", llava_dir))
    if llm_dir is not None:
        sources.append(("llm", llm_dir))
    if clip_dir is not None:
        sources.append(("clip", clip_dir))
    if not sources:
        raise ValueError("load_hf_weights needs llava_dir, llm_dir or clip_dir")

    targets = model.state_dict(keep_vars=True)  # keeps FQNs stable through AC/compile wrappers
    model_keys = set(targets)
    is_llava = any(k.startswith((OUR_LLM, OUR_VISION)) for k in model_keys)
    bare_prefix: str | None = None
    if not is_llava:
        if len(sources) != 1 or sources[0][0] == "llava":
            raise ValueError(
                "a LLaVA-NeXT checkpoint or an llm_dir + clip_dir pair needs a LlavaNext model"
            )
        bare_prefix = OUR_LLM if sources[0][0] == "llm" else OUR_VISION

    report = LoadReport()
    plans: dict[str, _Plan] = {}
    vision_layers: set[int] = set()
    for kind, directory in sources:
        ckpt = SafetensorsCheckpoint(directory)
        layout = detect_layout(ckpt.keys())
        if layout not in _EXPECTED_LAYOUTS[kind]:
            raise ValueError(
                f"{directory}: found a {layout!r} checkpoint where a {kind} one was expected"
            )
        for hf_key in ckpt.keys():
            our_key = hf_to_ours(hf_key, layout)
            if our_key is None:
                report.unrecognized.append(hf_key)
                continue
            if our_key == UNUSED:
                report.unused.append(hf_key)
                continue
            if m := _VISION_LAYER_RE.match(our_key):
                vision_layers.add(int(m.group(1)))
            target = _target_key(our_key, bare_prefix)
            if target not in model_keys:
                if our_key.startswith(OUR_VISION + "layers."):
                    report.unused.append(hf_key)  # layers past the selected one: never run
                    continue
                raise ValueError(
                    f"{directory}: tensor {hf_key!r} (ours {our_key!r}) has no place in the model; "
                    "does the model config match the checkpoint?"
                )
            if target in plans:
                raise ValueError(
                    f"{directory}: {hf_key!r} and {plans[target].hf_key!r} both map to {target!r}"
                )
            plans[target] = _validated_plan(ckpt, hf_key, our_key, targets[target], report)
    _check_vision_depth(model, vision_layers)
    if report.unrecognized and strict:
        raise ValueError(
            f"{len(report.unrecognized)} checkpoint tensors match no key table, e.g. "
            f"{report.unrecognized[:5]} (pass strict=False to ignore them)"
        )

    allowed_at_init = (OUR_PROJECTOR, OUR_NEWLINE) if llava_dir is None and is_llava else ()
    for target in sorted(model_keys - set(plans)):
        our_key = target if bare_prefix is None else bare_prefix + target
        if not (allowed_at_init and our_key.startswith(allowed_at_init)):
            raise ValueError(
                f"model tensor {target!r} is not in the checkpoint(s) "
                f"{', '.join(d for _, d in sources)}"
            )
        report.missing.append(target)

    for target, plan in plans.items():
        if plan.rows is None:
            value = plan.ckpt.get(plan.hf_key)
        else:
            value = plan.ckpt.get_rows(plan.hf_key, plan.rows)
        _copy_into(targets[target], value)
        report.loaded += 1
    return report


def _check_vision_depth(model: nn.Module, hf_layers: set[int]) -> None:
    """select_layer counts from the end of the PRETRAINED tower, so its depth must match exactly:
    silently taking the first layers of a deeper tower would select the wrong hidden state."""
    tower = getattr(model, "vision_tower", model)
    args = getattr(tower, "args", None)
    if not hf_layers or not isinstance(args, CLIPVisionArgs):
        return
    if len(hf_layers) != args.n_layers:
        raise ValueError(
            f"the checkpoint's vision tower has {len(hf_layers)} layers but the model args say "
            f"n_layers={args.n_layers} (select_layer={args.select_layer} counts from the end)"
        )


def _validated_plan(
    ckpt: SafetensorsCheckpoint, hf_key: str, our_key: str, param: torch.Tensor, report: LoadReport
) -> _Plan:
    hf_shape = ckpt.shape(hf_key)
    ours_shape = tuple(param.shape)  # global shape, also for DTensors
    if hf_shape == ours_shape:
        return _Plan(ckpt, hf_key, None)
    if (
        our_key in VOCAB_KEYS
        and len(hf_shape) == 2
        and hf_shape[1:] == ours_shape[1:]
        and hf_shape[0] > ours_shape[0]
    ):
        note = _special_rows_check(ckpt.directory, ours_shape[0], hf_shape[0])
        if note is not None and note not in report.notes:
            report.notes.append(note)
        report.truncated[our_key] = (hf_shape[0], ours_shape[0])
        return _Plan(ckpt, hf_key, ours_shape[0])
    raise ValueError(
        f"{ckpt.directory}: shape mismatch for {hf_key!r} -> {our_key!r}: checkpoint "
        f"{list(hf_shape)} vs model {list(ours_shape)}"
    )


@torch.no_grad()
def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    if isinstance(param, DTensor):
        local = param.to_local()
        # src_data_rank=None: every rank already holds the full tensor, so each one just slices
        # its own shard (no broadcast).
        shard = distribute_tensor(
            value.to(device=local.device, dtype=local.dtype),
            param.device_mesh,
            param.placements,
            src_data_rank=None,
        ).to_local()
        local.copy_(shard)
    else:
        param.copy_(value.to(device=param.device, dtype=param.dtype))
