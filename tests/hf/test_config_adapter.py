"""HF config.json -> our args, checked against transformers' own reading of the same dicts."""

from __future__ import annotations

import copy

import pytest
import transformers

from titan_llava.hf.config_adapter import (
    clip_vision_args_from_hf,
    llava_next_args_from_hf,
    vicuna_args_from_hf,
)

# lmsys/vicuna-7b-v1.5 config.json (transformers 4.31 era: no rope_theta key).
VICUNA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0",
    "use_cache": True,
    "vocab_size": 32000,
}
# llava-hf/llava-v1.6-vicuna-7b-hf config.json: sparse sub-configs, HF defaults fill the rest.
LLAVA_HF_CONFIG = {
    "architectures": ["LlavaNextForConditionalGeneration"],
    "ignore_index": -100,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_token_index": 32000,
    "model_type": "llava_next",
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_image_newline_parameter": True,
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
}


def _check_llm(args, hf):  # hf: a transformers LlamaConfig
    assert args.dim == hf.hidden_size and args.n_layers == hf.num_hidden_layers
    assert args.n_heads == hf.num_attention_heads
    assert args.kv_heads == hf.num_key_value_heads
    assert args.vocab_size == hf.vocab_size and args.hidden_dim == hf.intermediate_size
    assert args.norm_eps == hf.rms_norm_eps
    assert args.rope_theta == hf.rope_parameters["rope_theta"]
    assert args.max_seq_len == hf.max_position_embeddings


def _check_vision(args, hf):  # hf: a transformers CLIPVisionConfig
    assert (args.dim, args.n_layers, args.n_heads, args.hidden_dim) == (
        hf.hidden_size,
        hf.num_hidden_layers,
        hf.num_attention_heads,
        hf.intermediate_size,
    )
    assert (args.image_size, args.patch_size, args.norm_eps, args.hidden_act) == (
        hf.image_size,
        hf.patch_size,
        hf.layer_norm_eps,
        hf.hidden_act,
    )


def test_vicuna_config():
    args = vicuna_args_from_hf(VICUNA_CONFIG)
    _check_llm(args, transformers.LlamaConfig(**VICUNA_CONFIG))
    assert args.n_kv_heads is None and args.rope_theta == 10000.0 and args.max_seq_len == 4096


def test_llama_config_sparse_and_v5_style():
    _check_llm(vicuna_args_from_hf({"model_type": "llama"}), transformers.LlamaConfig())
    v5 = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "head_dim": 16,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
    }
    args = vicuna_args_from_hf(v5)
    _check_llm(args, transformers.LlamaConfig(**v5))
    assert args.n_kv_heads == 2 and args.rope_theta == 5e5


def test_llava_hf_config():
    args = llava_next_args_from_hf(LLAVA_HF_CONFIG)
    hf = transformers.LlavaNextConfig(**LLAVA_HF_CONFIG)
    _check_llm(args.llm, hf.text_config)
    _check_vision(args.vision, hf.vision_config)
    assert args.vision.select_layer == -2 and args.vision.n_built_layers == 23
    assert args.llm.vocab_size == 32064 and args.llm.norm_eps == 1e-5
    # HF lists [height, width]; ours are (width, height).
    assert args.grid_pinpoints == [(w, h) for h, w in hf.image_grid_pinpoints]
    assert args.grid_pinpoints[0] == (672, 336)
    assert args.image_aspect_ratio == "anyres" and args.projector_hidden_act == "gelu"


def test_llava_config_defaults():
    minimal = {"model_type": "llava_next"}
    args = llava_next_args_from_hf(minimal)
    hf = transformers.LlavaNextConfig()
    _check_llm(args.llm, hf.text_config)
    _check_vision(args.vision, hf.vision_config)


def test_clip_configs(hf_dirs):
    import json
    import os

    for kind in ("clip_vision", "clip"):
        with open(os.path.join(hf_dirs[kind], "config.json")) as f:
            cfg = json.load(f)
        hf = transformers.AutoConfig.from_pretrained(hf_dirs[kind])
        args = clip_vision_args_from_hf(cfg, select_layer=-2)
        _check_vision(args, hf.vision_config if kind == "clip" else hf)
        assert args.n_built_layers == 2
    # A sparse CLIPConfig: the vision half of openai/clip-vit-large-patch14-336.
    sparse = {
        "model_type": "clip",
        "vision_config": {
            "hidden_size": 1024,
            "image_size": 336,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "projection_dim": 768,
        },
    }
    _check_vision(clip_vision_args_from_hf(sparse), transformers.CLIPConfig(**sparse).vision_config)


def _with(cfg: dict, path: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[last] = value
    return cfg


@pytest.mark.parametrize(
    "path,value,key",
    [
        ("vision_feature_select_strategy", "full", "vision_feature_select_strategy"),
        ("vision_feature_layer", [-2, -5], "vision_feature_layer"),
        ("projector_hidden_act", "relu", "projector_hidden_act"),
        ("tie_word_embeddings", True, "tie_word_embeddings"),
        ("multimodal_projector_bias", False, "multimodal_projector_bias"),
        ("text_config.rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
        (
            "text_config.rope_parameters",
            {"rope_type": "llama3", "factor": 8.0},
            "rope_parameters.rope_type",
        ),
        ("text_config.attention_bias", True, "attention_bias"),
        ("text_config.mlp_bias", True, "mlp_bias"),
        ("text_config.tie_word_embeddings", True, "tie_word_embeddings"),
        ("text_config.hidden_act", "gelu", "hidden_act"),
        ("text_config.head_dim", 64, "head_dim"),
        ("text_config.model_type", "mistral", "model_type"),
        ("vision_config.hidden_act", "gelu", "hidden_act"),
        ("vision_config.num_channels", 1, "num_channels"),
        ("vision_config.model_type", "siglip_vision_model", "model_type"),
        ("model_type", "llava", "model_type"),
    ],
)
def test_bad_llava_configs_name_the_key(path, value, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as e:
        llava_next_args_from_hf(_with(LLAVA_HF_CONFIG, path, value))
    if "." in path:  # the sub-config is named too
        assert path.split(".")[0] in str(e.value)


def test_7b_flavors_are_the_released_architectures():
    """Every field of the named 7B flavors (eps, RoPE base, activation, selected layer included,
    not only the shapes the parameter counts see) equals what the released configs give."""
    from titan_llava.models.args import CLIP_FLAVORS, LLAVA_FLAVORS, VICUNA_FLAVORS

    assert VICUNA_FLAVORS["vicuna-7b"] == vicuna_args_from_hf(VICUNA_CONFIG)
    released = llava_next_args_from_hf(LLAVA_HF_CONFIG)
    assert CLIP_FLAVORS["clip-vit-l-14-336"] == released.vision
    flavor = LLAVA_FLAVORS["llava-next-vicuna-7b"]
    assert flavor.vision == released.vision and flavor.llm == VICUNA_FLAVORS["vicuna-7b"]
    assert sorted(flavor.grid_pinpoints) == sorted(released.grid_pinpoints)
