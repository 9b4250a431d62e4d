"""Test-only helpers: tiny random `transformers` reference models and small explicit HF -> ours
key maps (the real maps live in titan_llava.hf; these stay independent of them on purpose).
"""

from __future__ import annotations

import re

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from titan_llava.models.args import CLIPVisionArgs, VicunaArgs

_LLAMA_LAYER = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}
_LLAMA_GLOBAL = {"embed_tokens.weight": "tok_embeddings.weight", "norm.weight": "norm.weight"}

_CLIP_LAYER = {
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_CLIP_GLOBAL = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "patch_embed.weight",
    "embeddings.position_embedding.weight": "position_embedding.weight",
    "pre_layrnorm.weight": "pre_norm.weight",
    "pre_layrnorm.bias": "pre_norm.bias",
}


def llama_body_key(hf_key: str) -> str | None:
    """HF LlamaModel key (no `model.` prefix) -> our Vicuna key."""
    if hf_key in _LLAMA_GLOBAL:
        return _LLAMA_GLOBAL[hf_key]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", hf_key)
    if m and m.group(2) in _LLAMA_LAYER:
        return f"layers.{m.group(1)}.{_LLAMA_LAYER[m.group(2)]}"
    return None


def clip_key(hf_key: str, n_built: int) -> str | None:
    """HF CLIPVisionTransformer key (no `vision_model.` prefix) -> ours; None for unused HF keys."""
    if hf_key in _CLIP_GLOBAL:
        return _CLIP_GLOBAL[hf_key]
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.([a-z_0-9.]+)\.(weight|bias)", hf_key)
    if m and m.group(2) in _CLIP_LAYER:
        if int(m.group(1)) >= n_built:
            return None  # layers past select_layer are not built
        return f"layers.{m.group(1)}.{_CLIP_LAYER[m.group(2)]}.{m.group(3)}"
    if hf_key.startswith("post_layernorm.") or hf_key == "embeddings.position_ids":
        return None
    raise KeyError(f"unmapped CLIP key {hf_key}")


def convert(hf_sd: dict[str, torch.Tensor], key_fn) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in hf_sd.items():
        ours = key_fn(k)
        if ours is not None:
            out[ours] = v.clone()
    return out


def llama_config(args: VicunaArgs) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        rms_norm_eps=args.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=False,
    )


def clip_config(args: CLIPVisionArgs) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=args.dim,
        intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        image_size=args.image_size,
        patch_size=args.patch_size,
        layer_norm_eps=args.norm_eps,
        hidden_act=args.hidden_act,
    )


def randomize_(module: torch.nn.Module, std: float = 0.1) -> None:
    """Non-trivial values everywhere (norm weights/biases too) so a swapped key cannot go unnoticed."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + std * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
