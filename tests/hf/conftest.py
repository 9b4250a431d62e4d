"""Tiny random Hugging Face models saved once per session (safetensors), shared by the hf tests."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

LLAMA_KW = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=512,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
)
# Real tile geometry (336 / 14 -> 24x24 patches, 577 positions) so AnyRes token counts are real.
CLIP_VISION_KW = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=336,
    patch_size=14,
    projection_dim=16,
)
IMAGE_TOKEN_ID = 511


def _randomize(model: torch.nn.Module) -> None:
    # HF inits norms to 1/0 and some biases to 0; random values make key mix-ups detectable.
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.ndim == 1 else 0.0))


def _save(model: torch.nn.Module, directory: str, **kw) -> str:
    _randomize(model)
    model.save_pretrained(directory, safe_serialization=True, **kw)
    return directory


def hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_renamed(src_state: dict[str, torch.Tensor], directory: str, config: dict | None) -> str:
    """A checkpoint directory with exactly the given keys (for layouts we write ourselves)."""
    os.makedirs(directory, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in src_state.items()},
        os.path.join(directory, "model.safetensors"),
        metadata={"format": "pt"},
    )
    if config is not None:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f)
    return directory


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    """Saved tiny checkpoints: llama, clip_vision, clip (full CLIPModel), llava, llava_sharded."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    out = {}
    out["llama"] = _save(
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_KW)), str(root / "llama")
    )
    out["clip_vision"] = _save(
        transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_VISION_KW)),
        str(root / "clip_vision"),
    )
    clip_cfg = transformers.CLIPConfig(
        vision_config=CLIP_VISION_KW,
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=100,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        projection_dim=16,
    )
    out["clip"] = _save(transformers.CLIPModel(clip_cfg), str(root / "clip"))
    llava_cfg = transformers.LlavaNextConfig(
        vision_config=CLIP_VISION_KW, text_config=LLAMA_KW, image_token_index=IMAGE_TOKEN_ID
    )
    llava = transformers.LlavaNextForConditionalGeneration(llava_cfg)
    out["llava"] = _save(llava, str(root / "llava"))
    llava.save_pretrained(
        str(root / "llava_sharded"), safe_serialization=True, max_shard_size="100KB"
    )
    out["llava_sharded"] = str(root / "llava_sharded")
    return out


def load_hf(kind: str, directory: str) -> torch.nn.Module:
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "clip_vision": transformers.CLIPVisionModel,
        "clip": transformers.CLIPModel,
        "llava": transformers.LlavaNextForConditionalGeneration,
    }[kind]
    return cls.from_pretrained(directory).eval()
