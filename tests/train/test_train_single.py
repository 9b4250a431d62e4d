"""The trainer in one process: the README's debug command, step-1 loss vs transformers, and
config errors that must stop a run before any work."""

from __future__ import annotations

import math
import os

import pytest
import torch

from tests.train.utils import (
    HF_IMAGE_TOKEN_ID,
    SAMPLE_DATA,
    TOKENIZER,
    hf_init,
    make_hf_llava,
    read_metrics,
    run_train,
)

REQUIRED_KEYS = {"step", "loss", "grad_norm", "lr", "tokens_per_sec", "mfu", "memory_gib",
                 "alloc_retries"}


def test_debug_config_end_to_end(tmp_path):
    """The README's main command (fewer steps) trains and writes metrics.jsonl + the config."""
    dump = str(tmp_path / "run")
    proc = run_train(dump, ["--training.steps", "6", "--checkpoint.enable", "false"])
    records = read_metrics(dump)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert REQUIRED_KEYS <= set(r), set(r)
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert r["tokens_per_sec"] > 0 and r["image_tokens_per_sec"] > 0
        # 4 of the 20 samples a step: the data's epochs used so far, into the second epoch.
        assert r["epoch"] == pytest.approx(r["step"] * 4 / 20)
        assert set(r["data_events"]) == {"tokenization_mismatch", "truncated", "truncated_image_dropped"}
    # Running totals: the sample data has one sample longer than max_seq_len, cut before an image.
    assert all(a["data_events"]["truncated"] <= b["data_events"]["truncated"] for a, b in zip(records, records[1:]))
    assert records[-1]["data_events"]["truncated_image_dropped"] == 1
    log = proc.stdout + proc.stderr
    assert "this rank's epoch 1 began in step 6" in log and "epoch 1.200" in log
    assert "training done: 6 steps, 1.2000 epochs of this rank's data" in log
    # Warmup (2 steps) then cosine: lr of step 1 is 0 (HF schedule), peaks at step 3.
    assert records[0]["lr"] == 0.0 and records[2]["lr"] == pytest.approx(1e-3)
    assert os.path.isfile(os.path.join(dump, "config.json"))


def _first_batch(hf_dir: str):
    """The first micro-batch the trainer sees with the settings of test_step1_loss_*."""
    from titan_llava.data.loader import build_data_loader

    loader = build_data_loader(
        os.path.join(SAMPLE_DATA, "finetune.json"),
        SAMPLE_DATA,
        TOKENIZER,
        "vicuna_v1",
        4096,
        1,
        shuffle=False,
        seed=42,
    )
    batch = next(iter(loader))
    loader.close()
    return batch


@pytest.mark.parametrize("stage", ["finetune"])
def test_step1_loss_matches_transformers(tmp_path, stage):
    """Initialised from a HF LlavaNext checkpoint, step 1's loss equals transformers' loss on the
    same sample (fp32), i.e. weights, AnyRes, templates, masks and loss all agree."""
    transformers = pytest.importorskip("transformers")
    hf_dir = make_hf_llava(str(tmp_path / "hf"))
    dump = str(tmp_path / "run")
    run_train(
        dump,
        [
            "--training.steps", "1", "--training.local_batch_size", "1",
            "--training.global_batch_size", "1", "--data.shuffle", "false",
            "--lr_scheduler.warmup_steps", "0",
            "--checkpoint.enable", "false", *hf_init(hf_dir),
        ],
    )
    ours = read_metrics(dump)[0]["loss"]

    batch = _first_batch(hf_dir)
    assert batch.pixel_values is not None, "the first sample should have an image"
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(hf_dir).eval()
    input_ids = batch.input_ids.clone()
    input_ids[input_ids == -200] = HF_IMAGE_TOKEN_ID
    w, h = batch.image_sizes[0].tolist()
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            pixel_values=batch.pixel_values[None],
            image_sizes=torch.tensor([[h, w]]),
            labels=batch.labels,
        )
    theirs = out.loss.item()
    assert abs(ours - theirs) <= 1e-4 * abs(theirs), (ours, theirs)


@pytest.mark.parametrize(
    "override, message",
    [
        (["--training.bogus", "1"], "training.bogus"),
        (["--training.global_batch_size", "3"], "training.global_batch_size"),
        (["--data.path", "/nonexistent/data.json"], "data.path"),
        (["--training.trainable", "[\"projector\", \"decoder\"]"], "training.trainable"),
        # Checked against the resolved architecture, the device and the data index:
        (["--activation_checkpoint.llm_layers_without_ac", "99"], "llm_layers_without_ac (99)"),
        (["--model.attn_backend", "flex"], "model.attn_backend 'flex' cannot train on the CPU"),
        (["--training.steps", "-1", "--lr_scheduler.warmup_steps", "100"],
         "lr_scheduler.warmup_steps (100) exceeds the"),
    ],
)
def test_bad_config_fails_before_work(tmp_path, override, message):
    dump = str(tmp_path / "run")
    proc = run_train(dump, override, check=False, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(dump, "metrics.jsonl"))
    # Nothing is written for a config that fails a check (a rerun would resume its settings).
    assert not os.path.exists(os.path.join(dump, "config.json"))


def test_tokenizer_larger_than_vocab_fails(tmp_path):
    """A tokenizer with more pieces than the model has embedding rows is a config error."""
    dump = str(tmp_path / "run")
    # The debug LLM has 1024 rows; shrink them below the tokenizer's 1000 pieces via HF config.
    import transformers

    from tests.train.utils import HF_TEXT_KW, HF_VISION_KW

    cfg = transformers.LlavaNextConfig(
        vision_config=HF_VISION_KW,
        text_config={**HF_TEXT_KW, "vocab_size": 512},
        image_token_index=511,
    )
    transformers.LlavaNextForConditionalGeneration(cfg).save_pretrained(str(tmp_path / "hf"))
    proc = run_train(dump, hf_init(str(tmp_path / "hf")), check=False, timeout=120)
    assert proc.returncode == 2 and "model.tokenizer_path" in proc.stderr, proc.stderr[-3000:]
