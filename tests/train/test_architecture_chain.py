"""A run records the architecture it built (model_args.json); a run started from its DCP
checkpoint builds the same one, whatever [model].flavor says (stage 1 -> stage 2)."""

from __future__ import annotations

import json
import os

import pytest

from tests.train.utils import HF_IMAGE_TOKEN_ID, HF_TEXT_KW, HF_VISION_KW, hf_init, run_train

COMMON = ["--training.steps", "1", "--lr_scheduler.warmup_steps", "0",
          "--checkpoint.enable", "true", "--checkpoint.interval", "1"]


def test_stage2_inherits_a_non_flavor_architecture(tmp_path):
    transformers = pytest.importorskip("transformers")
    # Not the debug flavor: a different LLM FFN width and vision depth.
    cfg = transformers.LlavaNextConfig(
        vision_config={**HF_VISION_KW, "num_hidden_layers": 4},
        text_config={**HF_TEXT_KW, "intermediate_size": 96},
        image_token_index=HF_IMAGE_TOKEN_ID,
    )
    hf_dir = str(tmp_path / "hf")
    transformers.LlavaNextForConditionalGeneration(cfg).save_pretrained(hf_dir)

    stage1 = str(tmp_path / "stage1")
    run_train(stage1, COMMON + ["--training.trainable", "projector", *hf_init(hf_dir)])
    with open(os.path.join(stage1, "model_args.json")) as f:
        arch1 = json.load(f)
    assert arch1["llm"]["hidden_dim"] == 96 and arch1["vision"]["n_layers"] == 4

    stage2 = str(tmp_path / "stage2")
    run_train(stage2, COMMON + [
        "--model.flavor", "debug",  # would not fit the stage-1 weights
        "--checkpoint.initial_load_path", os.path.join(stage1, "checkpoint", "step-1"),
        "--checkpoint.initial_load_in_hf", "false",
        "--checkpoint.initial_load_model_only", "true",
    ])
    with open(os.path.join(stage2, "model_args.json")) as f:
        assert json.load(f) == arch1
