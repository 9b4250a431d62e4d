"""Explicit key maps between titan_llava state_dict keys and Hugging Face checkpoint keys.

One table per model part (Vicuna <-> Llama, CLIP tower <-> CLIP vision, LLaVA glue); a `Layout` says
where each part sits in a given HF checkpoint. Our keys are always in the `LlavaNext` namespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

# --- Vicuna <-> LlamaModel body (keys relative to the HF `LlamaModel`, i.e. without `model.`) -----
VICUNA_GLOBAL_KEYS: dict[str, str] = {
    "tok_embeddings.weight": "embed_tokens.weight",
    "norm.weight": "norm.weight",
}
VICUNA_LAYER_KEYS: dict[str, str] = {  # ours: layers.{i}.<k>  HF: layers.{i}.<v>
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}
# Buffers some older Llama checkpoints saved; RoPE tables are rebuilt by init_weights().
LLAMA_HF_ONLY_LAYER_KEYS = ("self_attn.rotary_emb.inv_freq",)

# --- CLIP tower <-> CLIP vision transformer (keys relative to `vision_model.`) ---------------
CLIP_GLOBAL_KEYS: dict[str, str] = {
    "patch_embed.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "position_embedding.weight": "embeddings.position_embedding.weight",
    "pre_norm.weight": "pre_layrnorm.weight",
    "pre_norm.bias": "pre_layrnorm.bias",
}
CLIP_LAYER_KEYS: dict[str, str] = {  # ours: layers.{i}.<k>  HF: encoder.layers.{i}.<v>
    **{f"norm1.{p}": f"layer_norm1.{p}" for p in ("weight", "bias")},
    **{f"norm2.{p}": f"layer_norm2.{p}" for p in ("weight", "bias")},
    **{
        f"attn.{proj}.{p}": f"self_attn.{proj}.{p}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
        for p in ("weight", "bias")
    },
    **{f"mlp.{fc}.{p}": f"mlp.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")},
}
# LLaVA never uses the CLIP head (post_layernorm) nor position_ids (a buffer in old checkpoints).
CLIP_HF_ONLY_KEYS = ("post_layernorm.weight", "post_layernorm.bias", "embeddings.position_ids")
# Parts of a full CLIPModel checkpoint that are not the vision tower (accepted, reported unused).
CLIP_MODEL_OTHER_PREFIXES = ("text_model.", "logit_scale", "text_projection.", "visual_projection.")

# --- LLaVA glue ----------------------------------------------------------------------------
PROJECTOR_KEYS = tuple(f"linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias"))

# Our top-level module names inside LlavaNext.
OUR_LLM, OUR_VISION, OUR_PROJECTOR, OUR_NEWLINE = (
    "language_model.",
    "vision_tower.",
    "projector.",
    "image_newline",
)


@dataclass(frozen=True)
class Layout:
    """Where each model part lives in one HF checkpoint layout (None = part absent)."""

    name: str
    llm_body: str | None = None  # prefix of the LlamaModel body keys
    lm_head: str | None = None  # full key of the LM head weight
    vision: str | None = None  # prefix of the CLIP vision transformer keys (canonical, for export)
    # Prefixes that hold the same vision keys in other writers' checkpoints (transformers >= 5
    # saves CLIP towers without the `vision_model.` level).
    vision_alt: tuple[str, ...] = ()
    projector: str | None = None
    image_newline: str | None = None
    ignored_prefixes: tuple[str, ...] = ()  # known HF parts that our model never uses


LAYOUTS: dict[str, Layout] = {
    # LlamaForCausalLM (Vicuna)
    "llama": Layout("llama", llm_body="model.", lm_head="lm_head.weight"),
    # CLIPVisionModel; "clip" also covers a full CLIPModel (text tower etc. reported unused)
    "clip": Layout(
        "clip", vision="vision_model.", vision_alt=("",), ignored_prefixes=CLIP_MODEL_OTHER_PREFIXES
    ),
    # llava-hf checkpoints (e.g. llava-hf/llava-v1.6-vicuna-7b-hf); the export target
    "llava_hf": Layout(
        "llava_hf",
        llm_body="language_model.model.",
        lm_head="language_model.lm_head.weight",
        vision="vision_tower.vision_model.",
        vision_alt=("vision_tower.",),
        projector="multi_modal_projector.",
        image_newline="image_newline",
    ),
    # the newer transformers layout (LlavaNextModel inside `model.`, lm_head at the top)
    "llava": Layout(
        "llava",
        llm_body="model.language_model.",
        lm_head="lm_head.weight",
        vision="model.vision_tower.vision_model.",
        vision_alt=("model.vision_tower.",),
        projector="model.multi_modal_projector.",
        image_newline="model.image_newline",
    ),
}

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_CLIP_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_INV_VICUNA_GLOBAL = {v: k for k, v in VICUNA_GLOBAL_KEYS.items()}
_INV_VICUNA_LAYER = {v: k for k, v in VICUNA_LAYER_KEYS.items()}
_INV_CLIP_GLOBAL = {v: k for k, v in CLIP_GLOBAL_KEYS.items()}
_INV_CLIP_LAYER = {v: k for k, v in CLIP_LAYER_KEYS.items()}

# Sentinel for "a known HF key that our model does not use".
UNUSED = "<unused>"


def detect_layout(hf_keys: Iterable[str]) -> str:
    """Name of the LAYOUTS entry a checkpoint's keys follow (raises ValueError if none fits)."""
    keys = list(hf_keys)
    if any(k.startswith("model.language_model.") for k in keys):
        return "llava"
    if any(k.startswith("language_model.model.") for k in keys):
        return "llava_hf"
    if any(k.startswith("model.layers.") or k == "model.embed_tokens.weight" for k in keys):
        return "llama"
    if any(k.startswith(("vision_model.", "encoder.layers.", "embeddings.")) for k in keys):
        return "clip"
    sample = ", ".join(sorted(keys)[:5])
    raise ValueError(f"unrecognised Hugging Face checkpoint layout (first keys: {sample})")


def _vicuna_body_to_ours(rest: str) -> str | None:
    if rest in _INV_VICUNA_GLOBAL:
        return _INV_VICUNA_GLOBAL[rest]
    m = _LAYER_RE.match(rest)
    if m:
        i, sub = m.groups()
        if sub in _INV_VICUNA_LAYER:
            return f"layers.{i}.{_INV_VICUNA_LAYER[sub]}"
        if sub in LLAMA_HF_ONLY_LAYER_KEYS:
            return UNUSED
    return None


def _clip_to_ours(rest: str) -> str | None:
    if rest in _INV_CLIP_GLOBAL:
        return _INV_CLIP_GLOBAL[rest]
    if rest in CLIP_HF_ONLY_KEYS:
        return UNUSED
    m = _HF_CLIP_LAYER_RE.match(rest)
    if m and m.group(2) in _INV_CLIP_LAYER:
        return f"layers.{m.group(1)}.{_INV_CLIP_LAYER[m.group(2)]}"
    return None


def hf_to_ours(hf_key: str, layout: str) -> str | None:
    """Our LlavaNext key for `hf_key` in `layout`; UNUSED for known HF-only keys; None if unknown.

    Every vision layer maps to `vision_tower.layers.{i}.*`; layers beyond the selected one do not
    exist in our model and the loader reports them as unused.
    """
    lay = LAYOUTS[layout]
    if lay.lm_head is not None and hf_key == lay.lm_head:
        return OUR_LLM + "output.weight"
    if lay.llm_body is not None and hf_key.startswith(lay.llm_body):
        ours = _vicuna_body_to_ours(hf_key[len(lay.llm_body) :])
        return ours if ours in (None, UNUSED) else OUR_LLM + ours
    if lay.image_newline is not None and hf_key == lay.image_newline:
        return OUR_NEWLINE
    if lay.projector is not None and hf_key.startswith(lay.projector):
        rest = hf_key[len(lay.projector) :]
        return OUR_PROJECTOR + rest if rest in PROJECTOR_KEYS else None
    if hf_key.startswith(lay.ignored_prefixes):
        return UNUSED
    if lay.vision is not None:
        # Longest prefix first: "vision_model." must win over the empty alternative.
        for prefix in sorted((lay.vision, *lay.vision_alt), key=len, reverse=True):
            if hf_key.startswith(prefix):
                ours = _clip_to_ours(hf_key[len(prefix) :])
                if ours is not None:
                    return ours if ours == UNUSED else OUR_VISION + ours
    return None


def ours_to_hf(our_key: str, layout: str) -> str:
    """HF key for our LlavaNext key `our_key` in `layout` (canonical writer form, used by export).

    Raises ValueError when the layout has no place for the key (e.g. a projector key in "llama").
    """
    lay = LAYOUTS[layout]
    hf: str | None = None
    if our_key.startswith(OUR_LLM) and lay.llm_body is not None:
        rest = our_key[len(OUR_LLM) :]
        if rest == "output.weight":
            hf = lay.lm_head
        elif rest in VICUNA_GLOBAL_KEYS:
            hf = lay.llm_body + VICUNA_GLOBAL_KEYS[rest]
        elif (m := _LAYER_RE.match(rest)) and m.group(2) in VICUNA_LAYER_KEYS:
            hf = f"{lay.llm_body}layers.{m.group(1)}.{VICUNA_LAYER_KEYS[m.group(2)]}"
    elif our_key.startswith(OUR_VISION) and lay.vision is not None:
        rest = our_key[len(OUR_VISION) :]
        if rest in CLIP_GLOBAL_KEYS:
            hf = lay.vision + CLIP_GLOBAL_KEYS[rest]
        elif (m := _LAYER_RE.match(rest)) and m.group(2) in CLIP_LAYER_KEYS:
            hf = f"{lay.vision}encoder.layers.{m.group(1)}.{CLIP_LAYER_KEYS[m.group(2)]}"
    elif our_key.startswith(OUR_PROJECTOR) and lay.projector is not None:
        rest = our_key[len(OUR_PROJECTOR) :]
        if rest in PROJECTOR_KEYS:
            hf = lay.projector + rest
    elif our_key == OUR_NEWLINE:
        hf = lay.image_newline
    if hf is None:
        raise ValueError(f"key {our_key!r} has no Hugging Face name in layout {layout!r}")
    return hf
