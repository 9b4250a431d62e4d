"""Hugging Face `config.json` dicts -> titan_llava model args (Llama, CLIP vision, LLaVA-NeXT).

Missing keys take the HF class defaults (restated here: the package never imports transformers);
any setting our modules do not implement raises ValueError naming the key.
"""

from __future__ import annotations

from typing import Any

from titan_llava.models.args import CLIPVisionArgs, LlavaNextArgs, VicunaArgs

# transformers' LlamaConfig defaults for the keys we read.
_LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "head_dim": None,
    "rope_theta": 10000.0,
}
# transformers' CLIPVisionConfig defaults.
_CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
# LlavaNextConfig builds this vision config when `vision_config` is absent (CLIP ViT-L/14-336).
_LLAVA_DEFAULT_VISION: dict[str, Any] = {
    "model_type": "clip_vision_model",
    "intermediate_size": 4096,
    "hidden_size": 1024,
    "patch_size": 14,
    "image_size": 336,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
}
_LLAVA_DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _get(cfg: dict, key: str, defaults: dict[str, Any]) -> Any:
    value = cfg.get(key)
    return defaults[key] if value is None else value


def _require(cond: bool, key: str, value: Any, why: str, where: str) -> None:
    if not cond:
        raise ValueError(f"{where}: unsupported {key}={value!r} ({why})")


def _rope_theta(cfg: dict, where: str) -> float:
    """RoPE base from either config style (old: rope_theta/rope_scaling; v5: rope_parameters)."""
    scaling = cfg.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        _require(
            kind == "default", "rope_scaling", scaling, "only plain RoPE is implemented", where
        )
    params = cfg.get("rope_parameters")
    if params is not None:
        _require(
            params.get("rope_type", "default") == "default",
            "rope_parameters.rope_type",
            params.get("rope_type"),
            "only plain RoPE is implemented",
            where,
        )
        _require(
            params.get("partial_rotary_factor", 1.0) == 1.0,
            "rope_parameters.partial_rotary_factor",
            params.get("partial_rotary_factor"),
            "only full-head RoPE is implemented",
            where,
        )
        if params.get("rope_theta") is not None:
            return float(params["rope_theta"])
    return float(_get(cfg, "rope_theta", _LLAMA_DEFAULTS))


def vicuna_args_from_hf(cfg: dict, where: str = "llama config") -> VicunaArgs:
    """`LlamaConfig` dict -> VicunaArgs (ValueError naming the key for unsupported settings)."""
    model_type = cfg.get("model_type", "llama")
    _require(model_type == "llama", "model_type", model_type, "expected a Llama model", where)
    g = lambda key: _get(cfg, key, _LLAMA_DEFAULTS)  # noqa: E731
    _require(g("hidden_act") == "silu", "hidden_act", g("hidden_act"), "SwiGLU uses silu", where)
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        _require(not g(key), key, g(key), "not implemented: must be false", where)
    dim, n_heads = int(g("hidden_size")), int(g("num_attention_heads"))
    head_dim = g("head_dim")
    _require(
        head_dim is None or int(head_dim) * n_heads == dim,
        "head_dim",
        head_dim,
        f"must equal hidden_size / num_attention_heads = {dim // max(n_heads, 1)}",
        where,
    )
    n_kv = g("num_key_value_heads")
    return VicunaArgs(
        dim=dim,
        n_layers=int(g("num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=None if n_kv is None or int(n_kv) == n_heads else int(n_kv),
        vocab_size=int(g("vocab_size")),
        hidden_dim=int(g("intermediate_size")),
        norm_eps=float(g("rms_norm_eps")),
        rope_theta=_rope_theta(cfg, where),
        max_seq_len=int(g("max_position_embeddings")),
    )


def clip_vision_args_from_hf(
    cfg: dict, select_layer: int = -2, where: str = "clip config"
) -> CLIPVisionArgs:
    """`CLIPVisionConfig` dict, or a `CLIPConfig` dict (its `vision_config`) -> CLIPVisionArgs."""
    if cfg.get("model_type") == "clip":
        cfg = cfg.get("vision_config") or {}
        where = f"{where} vision_config"
    model_type = cfg.get("model_type", "clip_vision_model")
    _require(
        model_type == "clip_vision_model", "model_type", model_type, "expected a CLIP tower", where
    )
    g = lambda key: _get(cfg, key, _CLIP_VISION_DEFAULTS)  # noqa: E731
    act = g("hidden_act")
    _require(act == "quick_gelu", "hidden_act", act, "LLaVA's CLIP tower uses quick_gelu", where)
    _require(g("num_channels") == 3, "num_channels", g("num_channels"), "RGB only", where)
    for key in ("image_size", "patch_size"):
        _require(isinstance(g(key), int), key, g(key), "must be one int (square)", where)
    return CLIPVisionArgs(
        image_size=int(g("image_size")),
        patch_size=int(g("patch_size")),
        dim=int(g("hidden_size")),
        n_layers=int(g("num_hidden_layers")),
        n_heads=int(g("num_attention_heads")),
        hidden_dim=int(g("intermediate_size")),
        norm_eps=float(g("layer_norm_eps")),
        select_layer=int(select_layer),
        hidden_act=act,
    )


def llava_next_args_from_hf(cfg: dict, where: str = "llava_next config") -> LlavaNextArgs:
    """`LlavaNextConfig` dict -> LlavaNextArgs (pinpoints [h, w] -> our (w, h))."""
    model_type = cfg.get("model_type")
    _require(model_type == "llava_next", "model_type", model_type, "expected llava_next", where)
    strategy = cfg.get("vision_feature_select_strategy", "default")
    _require(
        strategy == "default",
        "vision_feature_select_strategy",
        strategy,
        "LLaVA drops the CLS token ('default')",
        where,
    )
    layer = cfg.get("vision_feature_layer", -2)
    _require(isinstance(layer, int), "vision_feature_layer", layer, "must be one int", where)
    act = cfg.get("projector_hidden_act", "gelu")
    _require(act == "gelu", "projector_hidden_act", act, "mlp2x_gelu uses exact gelu", where)
    bias = cfg.get("multimodal_projector_bias", True)
    _require(bias is True, "multimodal_projector_bias", bias, "the projector has biases", where)
    newline = cfg.get("use_image_newline_parameter", True)
    _require(newline is True, "use_image_newline_parameter", newline, "spatial_unpad", where)
    tie = cfg.get("tie_word_embeddings", False)
    _require(not tie, "tie_word_embeddings", tie, "not implemented: must be false", where)

    text_cfg = cfg.get("text_config") or {}
    vision_cfg = cfg.get("vision_config")
    if vision_cfg is None:
        vision_cfg = _LLAVA_DEFAULT_VISION
    pinpoints_hw = cfg.get("image_grid_pinpoints") or _LLAVA_DEFAULT_PINPOINTS
    try:
        grid_pinpoints = [(int(w), int(h)) for h, w in pinpoints_hw]
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{where}: image_grid_pinpoints must be [height, width] pairs ({e})"
        ) from e
    return LlavaNextArgs(
        vision=clip_vision_args_from_hf(vision_cfg, layer, where=f"{where} vision_config"),
        llm=vicuna_args_from_hf(text_cfg, where=f"{where} text_config"),
        projector_hidden_act="gelu",
        image_aspect_ratio="anyres",
        grid_pinpoints=grid_pinpoints,
    )
