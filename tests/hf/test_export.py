"""Export from an in-memory LlavaNext: transformers loads it with no missing/unexpected keys, its
processor counts the same image tokens and produces the same prompt ids, logits and greedy
continuation match ours (the parity gate), vocab padding, and the gate's sensitivity."""

from __future__ import annotations

import copy
import json
import os
import stat

import pytest
import torch
from safetensors import safe_open

from tests.conftest import ASSETS
from titan_llava.data.anyres import num_image_tokens
from titan_llava.data.tokenizer import Tokenizer
from titan_llava.hf.export import export_state_dict
from titan_llava.hf.export_verify import load_processor, synthetic_image, verify_export
from titan_llava.models.args import LLAVA_FLAVORS
from titan_llava.models.llava import LlavaNext

transformers = pytest.importorskip("transformers")
TOKENIZER = os.path.join(ASSETS, "tokenizer", "tokenizer.model")  # 1000 pieces


def _random_model(vocab_size: int = 1024, seed: int = 0) -> LlavaNext:
    args = copy.deepcopy(LLAVA_FLAVORS["debug"])
    args.llm.vocab_size = vocab_size
    args.llm.rope_theta = 5e5  # not HF's default, so a dropped rope setting would show
    model = LlavaNext(args)
    g = torch.Generator().manual_seed(seed)
    with (
        torch.no_grad()
    ):  # random norms and biases too: any key mix-up changes the logits
        for p in model.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.ndim == 1 else 0.0)
            )
    return model.eval()


def _tensors(directory: str) -> dict[str, torch.Tensor]:
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for name in files:
        with safe_open(os.path.join(directory, name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _random_model()
    out = str(tmp_path_factory.mktemp("export") / "out")
    report = export_state_dict(
        model.state_dict().items(),
        model.args,
        TOKENIZER,
        out,
        torch.float32,
        max_shard_bytes=300_000,
    )
    return model, out, report


def test_transformers_loads_with_no_missing_keys(exported):
    model, out, report = exported
    assert (
        len(report.shards) > 1
    )  # the index + several shards path is the one exercised
    hf, info = transformers.LlavaNextForConditionalGeneration.from_pretrained(
        out, use_safetensors=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    cfg = hf.config
    assert cfg.image_token_index == 1000 and cfg.text_config.vocab_size == 1024
    assert cfg.text_config.pad_token_id == 1001
    assert cfg.vision_config.num_hidden_layers == 3 and cfg.vision_feature_layer == -2
    assert [tuple(p) for p in cfg.image_grid_pinpoints] == [
        (h, w) for w, h in model.args.grid_pinpoints
    ]
    # Our model tensors, bit for bit, under the llava-hf names.
    hf_sd = hf.state_dict()
    for ours, hf_key in [
        (
            "language_model.layers.1.attention.wk.weight",
            "model.language_model.layers.1.self_attn.k_proj.weight",
        ),
        (
            "vision_tower.layers.0.norm2.bias",
            "model.vision_tower.encoder.layers.0.layer_norm2.bias",
        ),
        ("projector.linear_2.weight", "model.multi_modal_projector.linear_2.weight"),
        ("image_newline", "model.image_newline"),
        ("language_model.output.weight", "lm_head.weight"),
    ]:
        assert torch.equal(model.state_dict()[ours], hf_sd[hf_key]), ours


@pytest.mark.parametrize(
    "size", [(500, 300), (300, 500), (336, 336), (1000, 200), (640, 480), (90, 700)]
)
def test_processor_image_token_count_matches_ours(exported, size):
    model, out, _ = exported
    processor = load_processor(out)  # the PIL backend, whether or not torchvision is installed
    inputs = processor(
        images=synthetic_image(*size), text="<image>\nhi", return_tensors="pt"
    )
    expected = num_image_tokens(
        size, model.args.grid_pinpoints, model.args.vision.image_size
    )
    assert int((inputs["input_ids"] == 1000).sum()) == expected


def test_tokenizer_json_matches_sentencepiece(exported):
    """transformers' tokenizer (from our tokenizer.json) == the legacy slow tokenizer we train with."""
    _, out, _ = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer(TOKENIZER)
    with open(os.path.join(ASSETS, "tokenizer", "corpus.txt")) as f:
        lines = [line for line in f.read().splitlines() if line][:300]
    lines += [
        "  two  spaces",
        "tab\tand\nnewline",
        "ünïcödé 日本 🙂",
        "a</s>b",
        "x ASSISTANT: y</s>",
    ]
    for text in lines:
        assert hf_tok(text)["input_ids"] == ours.encode(text, bos=True), text
    assert hf_tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [1000, 1001]


def test_parity_gate_passes_and_is_sensitive(exported):
    model, out, _ = exported
    result = verify_export(out, lambda dtype: copy.deepcopy(model), TOKENIZER)
    print(result.summary())
    assert result.ok, result.summary()
    assert result.image_tokens_ours == 1560 and len(result.greedy_hf) > 0

    def perturbed(dtype):
        m = copy.deepcopy(model)
        with torch.no_grad():
            m.image_newline.add_(1e-2)  # a 1% nudge of one image-path tensor
        return m

    bad = verify_export(out, perturbed, TOKENIZER)
    assert not bad.ok and bad.max_abs_diff > 1e-4


def test_bfloat16_export_gate_and_cast(tmp_path):
    model = _random_model()
    out = str(tmp_path / "bf16")
    export_state_dict(
        model.state_dict().items(), model.args, TOKENIZER, out, torch.bfloat16
    )
    tensors = _tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    w = model.state_dict()["projector.linear_1.weight"]
    assert torch.equal(
        tensors["multi_modal_projector.linear_1.weight"], w.to(torch.bfloat16)
    )
    result = verify_export(
        out, lambda dtype: copy.deepcopy(model), TOKENIZER, torch.bfloat16
    )
    assert result.ok, result.summary()


def test_vocab_padded_to_64_with_mean_rows(tmp_path):
    model = _random_model(
        vocab_size=1000
    )  # exactly the tokenizer: <image>, <pad> need new rows
    out = str(tmp_path / "pad")
    report = export_state_dict(
        model.state_dict().items(), model.args, TOKENIZER, out, torch.float32
    )
    assert report.vocab_rows == (1000, 1024)
    tensors = _tensors(out)
    for ours, hf_key in [
        (
            "language_model.tok_embeddings.weight",
            "language_model.model.embed_tokens.weight",
        ),
        ("language_model.output.weight", "language_model.lm_head.weight"),
    ]:
        w, e = model.state_dict()[ours], tensors[hf_key]
        assert e.shape == (1024, 64)
        assert torch.equal(e[:1000], w)
        assert torch.allclose(e[1000:], w.mean(0).expand(24, -1), atol=1e-7)
    # The new LM-head rows never win a greedy step, so the continuation is unchanged.
    result = verify_export(out, lambda dtype: copy.deepcopy(model), TOKENIZER)
    assert result.ok, result.summary()


def test_bad_inputs_name_the_problem(tmp_path):
    model = _random_model()
    sd = model.state_dict()
    with pytest.raises(ValueError, match="tokenizer"):
        export_state_dict(
            sd.items(), model.args, str(tmp_path / "none.model"), str(tmp_path / "a")
        )
    short = [(k, v) for k, v in sd.items() if k != "image_newline"]
    with pytest.raises(ValueError, match="missing"):
        export_state_dict(short, model.args, TOKENIZER, str(tmp_path / "b"))
    wrong = [
        (k, v[:-1] if k == "projector.linear_1.bias" else v) for k, v in sd.items()
    ]
    with pytest.raises(ValueError, match="projector.linear_1.bias"):
        export_state_dict(wrong, model.args, TOKENIZER, str(tmp_path / "c"))
    small = _random_model(vocab_size=512)
    with pytest.raises(ValueError, match="1000 pieces"):
        export_state_dict(
            small.state_dict().items(), small.args, TOKENIZER, str(tmp_path / "d")
        )
    assert not (tmp_path / "d").exists()  # refused before anything is written
    twice = [*sd.items(), ("image_newline", sd["image_newline"])]
    with pytest.raises(ValueError, match="'image_newline' appears twice"):
        export_state_dict(twice, model.args, TOKENIZER, str(tmp_path / "e"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        export_state_dict(sd.items(), model.args, TOKENIZER, str(tmp_path / "file"))


def test_config_names_the_dtype_both_ways(exported):
    """`dtype` (transformers >= 4.56) and `torch_dtype` (older releases, and vLLM on them)."""
    _, out, _ = exported
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    for section in (config, config["text_config"], config["vision_config"]):
        assert section["dtype"] == section["torch_dtype"] == config["dtype"]


def test_chat_template_renders_the_training_bos(exported):
    """vLLM's chat endpoint and tokenizer.apply_chat_template(tokenize=True) add no BOS themselves."""
    _, out, _ = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    ids = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids[:2]).count(hf_tok.bos_token_id) == 1 and ids[0] == hf_tok.bos_token_id


def test_re_export_replaces_the_earlier_shards(tmp_path):
    """A second export into the same folder (another shard count, an interrupted export's
    temporary) leaves only its own shards; other files stay; a model.safetensors, which
    transformers would load instead of the shards, is refused before anything is written."""
    model = _random_model()
    out = tmp_path / "out"
    first = export_state_dict(
        model.state_dict().items(), model.args, TOKENIZER, str(out), torch.float32,
        max_shard_bytes=300_000,
    )  # fmt: skip
    assert len(first.shards) > 2
    # safetensors writes 0600: the shards are readable as the config is (same umask).
    modes = {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert modes == {stat.S_IMODE((out / "config.json").stat().st_mode)}, modes
    (out / "model-tmp-00007.safetensors").write_bytes(b"left by a killed export")
    (out / "README.md").write_text("the user's own file")
    second = export_state_dict(
        model.state_dict().items(), model.args, TOKENIZER, str(out), torch.float32
    )
    assert second.shards == ["model-00001-of-00001.safetensors"]
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == second.shards
    assert (out / "README.md").read_text() == "the user's own file"
    assert any("removed" in n and first.shards[0] in n for n in second.notes), second.notes
    assert verify_export(str(out), lambda dtype: copy.deepcopy(model), TOKENIZER).ok

    (out / "model.safetensors").write_bytes(b"an earlier save_pretrained")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ValueError, match="model.safetensors, which transformers loads"):
        export_state_dict(
            model.state_dict().items(), model.args, TOKENIZER, str(out), torch.float32
        )
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_shard_writer_bounds_shards_indexes_them_and_keeps_foreign_files(tmp_path):
    """Shards hold at most max_shard_bytes (a single larger tensor alone), the index's total_size
    is every tensor's bytes, and a re-export deletes only this writer's own shard names."""
    from titan_llava.hf.export_weights import ShardWriter

    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"the user's adapter")
    (out / "model-00001-of-00009.safetensors").write_bytes(b"an earlier export's shard")
    writer = ShardWriter(str(out), max_shard_bytes=100)
    for i in range(3):
        writer.add(f"t{i}", torch.full((15,), float(i)))  # 60 bytes each: one per shard
    writer.add("big", torch.zeros(40))  # 160 bytes: a shard of its own
    names = writer.close()
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    with open(out / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert index["metadata"]["total_size"] == 3 * 60 + 160
    assert index["weight_map"] == {"t0": names[0], "t1": names[1], "t2": names[2], "big": names[3]}
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(names + ["adapter_model.safetensors"])
    assert writer.removed == ["model-00001-of-00009.safetensors"]


def test_unexpected_extra_vision_tensors_are_refused(tmp_path):
    from titan_llava.hf.export_weights import extra_vision_from_init, write_weights

    model = _random_model()
    extra = extra_vision_from_init(model.args.vision, seed=0)
    extra["encoder.layers.9.mlp.fc1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="extra vision tensors"):
        write_weights(model.state_dict().items(), model.args, str(tmp_path), torch.float32,
                      1024, extra, max_shard_bytes=1 << 30)
