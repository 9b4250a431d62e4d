"""The export CLI on real trainer checkpoints: a 2-process (FSDP2-sharded) checkpoint exports to the
same bytes as a 1-process one; HF -> ours (trainer, DCP) -> HF is bit-identical, with the unbuilt
CLIP layer and post_layernorm carried from the HF start; a trained checkpoint passes the gate."""

from __future__ import annotations

import os

import pytest
import torch

from tests.hf.test_export import _tensors
from tests.train.utils import hf_init, make_hf_llava, run_train
from titan_llava.hf.export import main as export_main
from titan_llava.hf.safetensors_io import SafetensorsCheckpoint

pytest.importorskip("transformers")

# lr 0: the saved weights are exactly the HF start, whatever the number of ranks.
FROZEN = [
    "--training.steps",
    "1",
    "--checkpoint.enable",
    "true",
    "--checkpoint.interval",
    "1",
    "--optimizer.lr",
    "0",
    "--optimizer.vision_lr",
    "0",
    "--training.global_batch_size",
    "4",
    "--lr_scheduler.warmup_steps",
    "0",
]


@pytest.fixture(scope="module")
def hf_start(tmp_path_factory):
    return make_hf_llava(str(tmp_path_factory.mktemp("hf") / "llava"))


# HF key -> the llava-hf layout the export writes (first matching prefix); transformers saves
# either that layout (kept) or its newer one (renamed).
_PREFIXES = [
    ("language_model.", "language_model."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("image_newline", "image_newline"),
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    ("lm_head.", "language_model.lm_head."),
]


def _llava_hf_name(key: str) -> str:
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    raise AssertionError(key)


def _export(step_dir: str, out: str, *extra: str) -> int:
    return export_main(
        ["--checkpoint", step_dir, "--output", out, "--dtype", "float32", *extra]
    )


def test_two_process_checkpoint_exports_like_one_and_round_trips(hf_start, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_train(one, FROZEN + hf_init(hf_start))
    run_train(two, FROZEN + hf_init(hf_start), nproc=2)
    step_one = os.path.join(one, "checkpoint", "step-1")
    step_two = os.path.join(two, "checkpoint", "step-1")
    assert len([f for f in os.listdir(step_two) if f.endswith(".distcp")]) == 2
    assert _export(step_one, str(tmp_path / "out1"), "--no-verify") == 0
    assert _export(step_two, str(tmp_path / "out2"), "--no-verify") == 0
    a, b = _tensors(str(tmp_path / "out1")), _tensors(str(tmp_path / "out2"))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)

    # HF -> ours -> HF: every tensor of the start, bit for bit, under the same names (the start
    # uses transformers' own layout; the export the llava-hf one, which it also reads).
    start = SafetensorsCheckpoint(hf_start)
    names = {_llava_hf_name(k): k for k in start.keys()}
    assert sorted(names) == sorted(a)
    for ours, theirs in names.items():
        assert torch.equal(a[ours], start.get(theirs)), ours
    # The exported directory is itself a valid start for a new run (and exports back unchanged).
    assert (
        "vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight" in a
    )  # never built by us


def test_trained_checkpoint_passes_the_gate(hf_start, tmp_path, capsys):
    dump = str(tmp_path / "run")
    run_train(
        dump,
        [
            "--training.steps",
            "2",
            "--checkpoint.enable",
            "true",
            "--checkpoint.interval",
            "2",
            *hf_init(hf_start),
        ],
    )
    step = os.path.join(dump, "checkpoint", "step-2")
    out = str(tmp_path / "out")
    assert _export(step, out) == 0  # runs the parity gate (transformers is installed)
    # Trained weights differ from the start; the unbuilt CLIP tensors do not.
    exp, start = _tensors(out), SafetensorsCheckpoint(hf_start)
    start_t = {_llava_hf_name(k): start.get(k) for k in start.keys()}
    assert not torch.equal(
        exp["multi_modal_projector.linear_1.weight"],
        start_t["multi_modal_projector.linear_1.weight"],
    )
    for key in (
        "vision_tower.vision_model.post_layernorm.bias",
        "vision_tower.vision_model.encoder.layers.2.self_attn.q_proj.weight",
    ):
        assert torch.equal(exp[key], start_t[key]), key


def test_missing_run_config_is_a_clear_error(tmp_path, capsys):
    assert _export(str(tmp_path), str(tmp_path / "out")) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_stage1_checkpoint_with_bf16_frozen_parts_exports(hf_start, tmp_path):
    """Stage 1 in bf16 stores the frozen LLM and CLIP in bf16 (frozen_param_dtype auto): the
    export passes the gate and writes them as the bf16-rounded start weights; the trained
    projector stays fp32."""
    dump = str(tmp_path / "run")
    run_train(dump, [
        "--training.steps", "2", "--checkpoint.enable", "true", "--checkpoint.interval", "2",
        "--training.trainable", "projector", "--data.template", "plain",
        "--data.path", "tests/assets/sample_data/pretrain.json", "--optimizer.lr", "1e-3",
        "--training.mixed_precision_param", "bfloat16", *hf_init(hf_start),
    ])  # fmt: skip
    out = str(tmp_path / "out")
    assert _export(os.path.join(dump, "checkpoint", "step-2"), out) == 0  # with the parity gate
    exp, start = _tensors(out), SafetensorsCheckpoint(hf_start)
    start_t = {_llava_hf_name(k): start.get(k) for k in start.keys()}
    for key in (
        "language_model.model.layers.0.mlp.down_proj.weight",
        "language_model.lm_head.weight",
        "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
    ):
        assert torch.equal(exp[key], start_t[key].to(torch.bfloat16).float()), key
        assert not torch.equal(exp[key], start_t[key]), key  # really went through bf16
    assert not torch.equal(exp["multi_modal_projector.linear_1.weight"],
                           start_t["multi_modal_projector.linear_1.weight"])
