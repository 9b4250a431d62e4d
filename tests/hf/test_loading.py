"""Tiny HF checkpoints -> our LlavaNext: bit-identical tensors, round trips, reports, errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from tests.hf.conftest import load_hf, write_renamed
from tests.hf.test_state_dict_adapter import contract_keys
from titan_llava.hf.loading import args_from_hf, load_hf_weights
from titan_llava.hf.state_dict_adapter import LAYOUTS, UNUSED, hf_to_ours, ours_to_hf
from titan_llava.models.llava import LlavaNext
from titan_llava.models.vicuna import Vicuna


def build(args) -> LlavaNext:
    """As the trainer does: meta -> to_empty -> init_weights."""
    with torch.device("meta"):
        model = LlavaNext(args)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def file_state(directory: str) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_matches_hf(model: torch.nn.Module, hf_state: dict, layout: str, prefix: str = "") -> set:
    """Every HF tensor that maps into `model` is bit-identical there; returns the covered keys."""
    ours = model.state_dict()
    covered = set()
    for hf_key, value in hf_state.items():
        key = hf_to_ours(hf_key, layout)
        if key in (None, UNUSED):
            continue
        key = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        if key in ours:
            assert torch.equal(ours[key], value), hf_key
            covered.add(key)
    return covered


@pytest.mark.parametrize("which", ["llava", "llava_sharded"])
def test_llava_hf_checkpoint_loads_bit_identical(hf_dirs, which):
    args = args_from_hf(llava_dir=hf_dirs[which])
    model = build(args)
    assert set(model.state_dict()) == contract_keys(2, 2)  # the model honours the contract
    report = load_hf_weights(model, llava_dir=hf_dirs[which])
    assert report.missing == [] and report.unrecognized == [] and report.truncated == {}
    assert report.loaded == len(contract_keys(2, 2))
    assert sorted(report.unused) == sorted(
        [k for k in file_state(hf_dirs["llava"]) if ".layers.2." in k or "post_layernorm" in k]
    )
    # Reference: transformers' own in-memory model loaded from the same directory.
    hf = load_hf("llava", hf_dirs[which])
    covered = assert_matches_hf(model, hf.state_dict(), "llava")
    assert covered == set(model.state_dict())


@pytest.mark.parametrize("layout", ["llava_hf", "llava"])
def test_round_trip_through_transformers(hf_dirs, tmp_path, layout):
    """ours -> HF keys -> transformers loads them, nothing missing -> our loader -> identical."""
    src = hf_dirs["llava"]
    model = build(args_from_hf(llava_dir=src))
    load_hf_weights(model, llava_dir=src)
    exported = {ours_to_hf(k, layout): v for k, v in model.state_dict().items()}
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    # Our model has no last vision layer / post_layernorm; transformers wants them.
    only_ours = write_renamed(exported, str(tmp_path / "ours"), config)
    hf_model, info = type(load_hf("llava", src)).from_pretrained(
        only_ours, output_loading_info=True
    )
    assert not info["unexpected_keys"]
    assert all(".layers.2." in k or "post_layernorm" in k for k in info["missing_keys"])
    assert len(info["missing_keys"]) == 18  # 16 layer tensors + 2 post_layernorm
    # Complete it with the HF-only tensors from the source: a clean load, tensor for tensor equal.
    extra = {}
    for k, v in file_state(src).items():
        if ".layers.2." in k or "post_layernorm" in k:
            extra[LAYOUTS[layout].vision + k.split("vision_tower.", 1)[1]] = v
    full = write_renamed({**exported, **extra}, str(tmp_path / "full"), config)
    hf_model, info = type(load_hf("llava", src)).from_pretrained(full, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref = load_hf("llava", src).state_dict()
    for k, v in hf_model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # And our loader reads our own export back, in this layout, bit for bit.
    again = build(args_from_hf(llava_dir=full))
    report = load_hf_weights(again, llava_dir=full)
    assert report.missing == [] and len(report.unused) == 18
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


@pytest.mark.parametrize("clip_kind", ["clip", "clip_vision"])
def test_llm_plus_clip_dirs(hf_dirs, clip_kind):
    args = args_from_hf(llm_dir=hf_dirs["llama"], clip_dir=hf_dirs[clip_kind])
    assert args.vision.n_built_layers == 2 and args.llm.n_layers == 2
    model = build(args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_hf_weights(model, llm_dir=hf_dirs["llama"], clip_dir=hf_dirs[clip_kind])
    # Stage 1: projector + image_newline start from init; everything else is loaded.
    assert sorted(report.missing) == sorted(
        [f"projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]
        + ["image_newline"]
    )
    for k in report.missing:
        assert torch.equal(model.state_dict()[k], before[k])
    assert report.loaded == len(before) - 5
    unused = set(report.unused)
    assert any("post_layernorm" in k for k in unused) and any(".layers.2." in k for k in unused)
    if clip_kind == "clip":
        assert {"logit_scale", "text_projection.weight", "visual_projection.weight"} <= unused
        assert any(k.startswith("text_model.") for k in unused)
    covered = assert_matches_hf(model, load_hf("llama", hf_dirs["llama"]).state_dict(), "llama")
    clip_state = file_state(hf_dirs[clip_kind])
    covered |= assert_matches_hf(model, clip_state, "clip")
    assert covered == set(before) - set(report.missing)


def test_bare_vicuna_from_llm_dir(hf_dirs):
    args = args_from_hf(llm_dir=hf_dirs["llama"], clip_dir=hf_dirs["clip"])
    vicuna = Vicuna(args.llm)
    report = load_hf_weights(vicuna, llm_dir=hf_dirs["llama"])
    assert report.missing == [] and report.loaded == len(vicuna.state_dict())
    covered = assert_matches_hf(
        vicuna, file_state(hf_dirs["llama"]), "llama", prefix="language_model."
    )
    assert covered == set(vicuna.state_dict())


def test_errors(hf_dirs, tmp_path):
    llava = hf_dirs["llava"]
    args = args_from_hf(llava_dir=llava)
    with pytest.raises(ValueError, match="not both"):
        load_hf_weights(build(args), llava_dir=llava, llm_dir=hf_dirs["llama"])
    with pytest.raises(ValueError, match="vision_tower.*not in the checkpoint"):
        load_hf_weights(build(args), llm_dir=hf_dirs["llama"])  # vision tower would stay random
    with pytest.raises(ValueError, match="'clip' checkpoint where a llm one"):
        load_hf_weights(build(args), llm_dir=hf_dirs["clip"], clip_dir=hf_dirs["clip"])
    # Shape mismatch names the HF key, our key and both shapes.
    bad = args_from_hf(llava_dir=llava)
    bad.llm.hidden_dim = 96
    mlp = r"'language_model\.model\.layers\.\d\.mlp\.(gate|up|down)_proj\.weight' -> "
    mlp += r"'language_model\.layers\.\d\.feed_forward\.w[123]\.weight'"
    shapes = r"checkpoint \[(128, 64|64, 128)\] vs model \[(96, 64|64, 96)\]"
    with pytest.raises(ValueError, match=f"shape mismatch for {mlp}: {shapes}"):
        load_hf_weights(build(bad), llava_dir=llava)
    # The checkpoint has more LLM layers than the model: an error, not "unused".
    short = args_from_hf(llava_dir=llava)
    short.llm.n_layers = 1
    with pytest.raises(ValueError, match="layers.1.*no place in the model"):
        load_hf_weights(build(short), llava_dir=llava)
    # A vision tower of another depth: select_layer would pick the wrong hidden state.
    other = args_from_hf(llava_dir=llava)
    other.vision.n_layers, other.vision.select_layer = 2, -1  # builds 2 layers, like the real args
    with pytest.raises(ValueError, match="vision tower has 3 layers.*n_layers=2"):
        load_hf_weights(build(other), llava_dir=llava)
    # The model has a layer the checkpoint lacks.
    deep = args_from_hf(llava_dir=llava)
    deep.llm.n_layers = 3
    with pytest.raises(ValueError, match="language_model.layers.2.*not in the checkpoint"):
        load_hf_weights(build(deep), llava_dir=llava)
    # Tensors in no table: an error unless strict=False, then reported.
    state = file_state(llava)
    odd = write_renamed(
        {**state, "language_model.model.layers.0.self_attn.q_proj.bias": torch.zeros(64)},
        str(tmp_path / "odd"),
        None,
    )
    with pytest.raises(ValueError, match="q_proj.bias"):
        load_hf_weights(build(args), llava_dir=odd)
    report = load_hf_weights(build(args), llava_dir=odd, strict=False)
    assert report.unrecognized == ["language_model.model.layers.0.self_attn.q_proj.bias"]


def _padded_vocab_dir(hf_dirs, tmp_path, name, tokens: dict[int, bool] | None) -> str:
    """The tiny llava checkpoint with embed/lm_head padded 512 -> 520 rows (as llava-hf pads)."""
    state = file_state(hf_dirs["llava"])
    for k in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        state[k] = torch.cat([state[k], torch.randn(8, state[k].shape[1])])
    d = write_renamed(state, str(tmp_path / name), None)
    shutil.copy(os.path.join(hf_dirs["llava"], "config.json"), d)
    if tokens is not None:
        decoder = {str(i): {"content": f"<t{i}>", "special": s} for i, s in tokens.items()}
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump({"added_tokens_decoder": decoder}, f)
    return d


def test_vocab_rows_truncated_only_for_special_tokens(hf_dirs, tmp_path):
    args = args_from_hf(llava_dir=hf_dirs["llava"])  # vocab 512
    # Rows 512, 513 are special added tokens; 514..519 alignment padding: keep the first 512 rows.
    d = _padded_vocab_dir(hf_dirs, tmp_path, "ok", {511: True, 512: True, 513: True})
    model = build(args)
    report = load_hf_weights(model, llava_dir=d)
    assert report.truncated == {
        "language_model.tok_embeddings.weight": (520, 512),
        "language_model.output.weight": (520, 512),
    }
    assert report.notes == []
    state = file_state(d)
    assert torch.equal(
        model.state_dict()["language_model.output.weight"],
        state["language_model.lm_head.weight"][:512],
    )
    assert torch.equal(
        model.state_dict()["language_model.tok_embeddings.weight"],
        state["language_model.model.embed_tokens.weight"][:512],
    )
    # A dropped row that is a normal (non-special) added token: refuse.
    d = _padded_vocab_dir(hf_dirs, tmp_path, "bad", {512: True, 513: False})
    with pytest.raises(ValueError, match="row 513"):
        load_hf_weights(build(args), llava_dir=d)
    # No tokenizer files: allowed, but the report says it could not be verified.
    d = _padded_vocab_dir(hf_dirs, tmp_path, "unknown", None)
    report = load_hf_weights(build(args), llava_dir=d)
    assert len(report.notes) == 1 and "could not verify" in report.notes[0]
    # Fewer rows than the model: a shape error.
    big = args_from_hf(llava_dir=hf_dirs["llava"], vocab_size=600)
    with pytest.raises(
        ValueError, match=r"(embed_tokens|lm_head).*\[512, 64\] vs model \[600, 64\]"
    ):
        load_hf_weights(build(big), llava_dir=hf_dirs["llava"])


def test_a_llava_checkpoint_must_hold_the_projector(hf_dirs, tmp_path):
    """Only the llm_dir + clip_dir start leaves the projector at init; a LLaVA-NeXT checkpoint
    without it is an error, not a silently random projector."""
    state = {k: v for k, v in file_state(hf_dirs["llava"]).items()
             if not k.startswith("multi_modal_projector.")}
    d = write_renamed(state, str(tmp_path / "no_projector"), None)
    shutil.copy(os.path.join(hf_dirs["llava"], "config.json"), d)
    args = args_from_hf(llava_dir=hf_dirs["llava"])
    with pytest.raises(ValueError, match="projector.linear_1.bias' is not in the checkpoint"):
        load_hf_weights(build(args), llava_dir=d)


def test_dropped_vocab_rows_may_not_be_base_tokens(hf_dirs, tmp_path):
    """A tokenizer.json with more base pieces than the model's rows: the extra rows are real
    tokens (no added-token entry says otherwise), so they may not be cut."""
    d = _padded_vocab_dir(hf_dirs, tmp_path, "base", None)
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump({"model": {"vocab": {f"t{i}": i for i in range(516)}}, "added_tokens": []}, f)
    args = args_from_hf(llava_dir=hf_dirs["llava"])
    with pytest.raises(ValueError, match="516 base tokens; a model with vocab_size 512 would drop"):
        load_hf_weights(build(args), llava_dir=d)


def test_two_checkpoint_tensors_for_one_parameter_are_refused(hf_dirs, tmp_path):
    """A CLIP checkpoint holding a tensor both with and without the `vision_model.` prefix (two
    writers' files merged): which one would load is arbitrary, so it is an error."""
    state = file_state(hf_dirs["clip_vision"])
    (key,) = [k for k in state if k.endswith("embeddings.class_embedding")]
    other = key.removeprefix("vision_model.") if key.startswith("vision_model.") else "vision_model." + key
    state[other] = state[key] + 1
    d = write_renamed(state, str(tmp_path / "dup"), None)
    shutil.copy(os.path.join(hf_dirs["clip_vision"], "config.json"), d)
    args = args_from_hf(llm_dir=hf_dirs["llama"], clip_dir=hf_dirs["clip_vision"])
    with pytest.raises(ValueError, match="both map to 'vision_tower.class_embedding'"):
        load_hf_weights(build(args), llm_dir=hf_dirs["llama"], clip_dir=d)
