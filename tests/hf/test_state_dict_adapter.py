"""Key tables vs the contract's parameter names and transformers' real checkpoint keys."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from titan_llava.hf.state_dict_adapter import UNUSED, detect_layout, hf_to_ours, ours_to_hf


def contract_keys(n_llm: int, n_vision_built: int) -> set[str]:
    """Our LlavaNext state_dict keys, written out from the model contract (not from our code)."""
    keys = {"language_model.tok_embeddings.weight", "language_model.norm.weight"}
    keys.add("language_model.output.weight")
    for i in range(n_llm):
        for k in (
            "attention_norm",
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "attention.wo",
            "ffn_norm",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
        ):
            keys.add(f"language_model.layers.{i}.{k}.weight")
    keys |= {
        "vision_tower.patch_embed.weight",
        "vision_tower.class_embedding",
        "vision_tower.position_embedding.weight",
        "vision_tower.pre_norm.weight",
        "vision_tower.pre_norm.bias",
    }
    for i in range(n_vision_built):
        for m in (
            "norm1",
            "norm2",
            "attn.q_proj",
            "attn.k_proj",
            "attn.v_proj",
            "attn.out_proj",
            "mlp.fc1",
            "mlp.fc2",
        ):
            for p in ("weight", "bias"):
                keys.add(f"vision_tower.layers.{i}.{m}.{p}")
    keys |= {f"projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    keys.add("image_newline")
    return keys


def file_keys(directory: str) -> list[str]:
    with safe_open(f"{directory}/model.safetensors", "pt") as f:
        return list(f.keys())


def test_llava_hf_keys_map_onto_contract(hf_dirs):
    keys = file_keys(hf_dirs["llava"])
    layout = detect_layout(keys)
    assert layout == "llava_hf"
    mapped = {k: hf_to_ours(k, layout) for k in keys}
    assert None not in mapped.values(), [k for k, v in mapped.items() if v is None]
    unused = sorted(k for k, v in mapped.items() if v == UNUSED)
    assert unused == ["vision_tower.post_layernorm.bias", "vision_tower.post_layernorm.weight"]
    ours = [v for v in mapped.values() if v != UNUSED]
    assert len(ours) == len(set(ours))
    # 3 vision layers in the file; the map covers all of them (the loader drops the unbuilt one).
    assert set(ours) == contract_keys(2, 3)


@pytest.mark.parametrize("layout", ["llava_hf", "llava"])
def test_ours_to_hf_round_trip(layout):
    for key in sorted(contract_keys(2, 2)):
        hf = ours_to_hf(key, layout)
        assert hf_to_ours(hf, layout) == key
    # Canonical writer forms (what transformers' llava-hf checkpoints and the newer layout use).
    assert ours_to_hf("vision_tower.layers.1.attn.q_proj.bias", layout).endswith(
        "vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.bias"
    )
    expected_head = {"llava_hf": "language_model.lm_head.weight", "llava": "lm_head.weight"}[layout]
    assert ours_to_hf("language_model.output.weight", layout) == expected_head


def test_newer_layout_names():
    assert ours_to_hf("language_model.layers.0.feed_forward.w1.weight", "llava") == (
        "model.language_model.layers.0.mlp.gate_proj.weight"
    )
    assert ours_to_hf("image_newline", "llava") == "model.image_newline"
    assert (
        ours_to_hf("projector.linear_2.bias", "llava")
        == "model.multi_modal_projector.linear_2.bias"
    )
    assert detect_layout(["model.language_model.norm.weight", "lm_head.weight"]) == "llava"
    # transformers >= 5 in-memory form of the vision tower (no `vision_model.` level) also maps.
    assert hf_to_ours("model.vision_tower.embeddings.class_embedding", "llava") == (
        "vision_tower.class_embedding"
    )


def test_llama_keys(hf_dirs):
    keys = file_keys(hf_dirs["llama"])
    assert detect_layout(keys) == "llama"
    ours = {hf_to_ours(k, "llama") for k in keys}
    assert ours == {k for k in contract_keys(2, 0) if k.startswith("language_model.")}
    for k in keys:
        assert ours_to_hf(hf_to_ours(k, "llama"), "llama") == k
    # Old checkpoints carry RoPE buffers: known, unused.
    assert hf_to_ours("model.layers.3.self_attn.rotary_emb.inv_freq", "llama") == UNUSED
    assert hf_to_ours("model.layers.0.self_attn.q_proj.bias", "llama") is None


def test_clip_model_keys(hf_dirs):
    keys = file_keys(hf_dirs["clip"])
    assert detect_layout(keys) == "clip"
    mapped = {k: hf_to_ours(k, "clip") for k in keys}
    assert None not in mapped.values()
    unused = {k for k, v in mapped.items() if v == UNUSED}
    assert {
        "logit_scale",
        "text_projection.weight",
        "visual_projection.weight",
        "vision_model.post_layernorm.weight",
    } <= unused
    assert any(k.startswith("text_model.") for k in unused)
    ours = {v for v in mapped.values() if v != UNUSED}
    assert ours == {k for k in contract_keys(0, 3) if k.startswith("vision_tower.")}
    for k, v in mapped.items():
        if v != UNUSED:
            assert ours_to_hf(v, "clip") == k  # CLIPModel keeps the `vision_model.` level


def test_clip_vision_model_without_prefix(hf_dirs):
    # transformers >= 5 saves CLIPVisionModel without `vision_model.`; older writers (and
    # openai/clip-vit-large-patch14-336) keep it. Both map to the same keys.
    keys = file_keys(hf_dirs["clip_vision"])
    assert detect_layout(keys) == "clip"
    for k in keys:
        a, b = hf_to_ours(k, "clip"), hf_to_ours("vision_model." + k, "clip")
        assert a == b and a is not None


def test_unknown_and_misplaced_keys():
    assert hf_to_ours("multi_modal_projector.linear_3.weight", "llava_hf") is None
    assert hf_to_ours("something.else", "llava_hf") is None
    with pytest.raises(ValueError, match="projector.linear_1.weight"):
        ours_to_hf("projector.linear_1.weight", "llama")
    with pytest.raises(ValueError, match="unrecognised"):
        detect_layout(["foo.bar"])
