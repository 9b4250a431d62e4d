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
    # The export with --config (the run's model_args.json then unused) resolves the same
    # architecture through the chain, and its log names where it came from (not the flavor).
    from titan_llava.hf.export_dcp import resolve_run

    run = resolve_run(os.path.join(stage2, "checkpoint", "step-1"), os.path.join(stage2, "config.json"))
    assert run.args.llm.hidden_dim == 96 and run.args.vision.n_layers == 4
    assert run.arch_source == f"{os.path.join(stage1, 'model_args.json')} (the run this one started from)"


def test_grid_pinpoints_come_from_the_starting_checkpoint(tmp_path):
    """A LlavaNext directory's image_grid_pinpoints ([h, w]) and an earlier run's model_args.json
    are the starting checkpoint's own: with model.grid_pinpoints unset they are used; set, they
    must be the same candidates (any order), else a set-up error naming the key."""
    transformers = pytest.importorskip("transformers")
    from titan_llava.architecture import resolve_model_args
    from titan_llava.config import load_config
    from titan_llava.models.args import llava_args_to_dict

    pins_hw = [[336, 336], [336, 1344], [1344, 336]]
    cfg = transformers.LlavaNextConfig(vision_config=HF_VISION_KW, text_config=HF_TEXT_KW,
                                       image_token_index=HF_IMAGE_TOKEN_ID,
                                       image_grid_pinpoints=pins_hw)
    hf_dir = str(tmp_path / "hf")
    transformers.LlavaNextForConditionalGeneration(cfg).save_pretrained(hf_dir)
    own = [(336, 336), (1344, 336), (336, 1344)]  # (w, h)
    hf = ["--checkpoint.initial_load_path", hf_dir, "--checkpoint.initial_load_in_hf", "true"]
    assert resolve_model_args(load_config(hf)).grid_pinpoints == own
    reordered = [(336, 1344), (336, 336), (1344, 336)]
    assert resolve_model_args(load_config(
        hf + ["--model.grid_pinpoints", json.dumps(reordered)])).grid_pinpoints == reordered
    with pytest.raises(ValueError, match=r"model.grid_pinpoints \[\(336, 672\)"):
        resolve_model_args(load_config(hf + ["--model.grid_pinpoints", "[[336, 672], [672, 336]]"]))

    # An earlier run's recorded architecture (stage 1 -> stage 2).
    run = tmp_path / "stage1"
    (run / "checkpoint" / "step-1").mkdir(parents=True)
    (run / "model_args.json").write_text(json.dumps(
        llava_args_to_dict(resolve_model_args(load_config(hf)))))
    dcp = ["--checkpoint.initial_load_path", str(run / "checkpoint" / "step-1")]
    assert resolve_model_args(load_config(dcp)).grid_pinpoints == own
    with pytest.raises(ValueError, match="model_args.json"):
        resolve_model_args(load_config(dcp + ["--model.grid_pinpoints", "[[672, 672]]"]))
    # No checkpoint of its own (a flavor, or LLM + CLIP directories): the setting applies.
    assert resolve_model_args(load_config(
        ["--model.grid_pinpoints", "[[672, 672]]"])).grid_pinpoints == [(672, 672)]


def test_image_aspect_ratio_comes_from_the_earlier_run(tmp_path, caplog):
    """model.image_aspect_ratio unset: the mode an earlier run recorded in model_args.json (a
    stage 1 trained with "pad" stays "pad"), else "anyres". Set to another mode, it is used and
    the set-up log warns, naming the file the earlier mode came from."""
    from titan_llava.architecture import resolve_model_args
    from titan_llava.config import load_config
    from titan_llava.models.args import llava_args_to_dict

    assert resolve_model_args(load_config([])).image_aspect_ratio == "anyres"
    assert resolve_model_args(load_config(["--model.image_aspect_ratio", "pad"])).image_aspect_ratio == "pad"

    run = tmp_path / "stage1"
    (run / "checkpoint" / "step-1").mkdir(parents=True)
    recorded = resolve_model_args(load_config(["--model.image_aspect_ratio", "pad"]))
    (run / "model_args.json").write_text(json.dumps(llava_args_to_dict(recorded)))
    dcp = ["--checkpoint.initial_load_path", str(run / "checkpoint" / "step-1")]
    caplog.set_level("WARNING", logger="titan_llava")
    assert resolve_model_args(load_config(dcp)).image_aspect_ratio == "pad"
    assert resolve_model_args(load_config(dcp + ["--model.image_aspect_ratio", "pad"])).image_aspect_ratio == "pad"
    assert not caplog.records
    assert resolve_model_args(load_config(
        dcp + ["--model.image_aspect_ratio", "anyres"])).image_aspect_ratio == "anyres"
    (warning,) = caplog.records
    assert "'anyres'" in warning.getMessage() and "'pad'" in warning.getMessage()
    assert "model_args.json" in warning.getMessage()
