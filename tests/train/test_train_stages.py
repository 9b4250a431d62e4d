"""Stage 1 trains only the projector (+ image_newline); stage 2 trains all three parts with their
own learning rates; frozen parts get neither gradients nor optimizer state."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.train.utils import DEBUG_CONFIG, REPO, hf_init, make_hf_llava, read_metrics


def _probe(tmp_path, overrides: list[str], run: str = "run") -> dict:
    out = str(tmp_path / f"{run}.json")
    cmd = [
        sys.executable, "-m", "tests.train.stage_probe", out,
        "--job.config_file", DEBUG_CONFIG, "--job.dump_folder", str(tmp_path / run),
        "--checkpoint.enable", "false", "--training.steps", "3",
        "--lr_scheduler.warmup_steps", "0", *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(out) as f:
        return json.load(f)


def test_stage1_changes_only_projector_and_newline(tmp_path):
    r = _probe(tmp_path, [
        "--training.trainable", "projector", "--data.template", "plain",
        "--data.path", "tests/assets/sample_data/pretrain.json", "--optimizer.lr", "1e-3",
    ])
    for name, changed in r["changed"].items():
        trainable = name.startswith(("projector.", "image_newline"))
        assert r["requires_grad"][name] == trainable, name
        # Frozen parameters are bit-identical; every trainable one moved.
        assert changed == trainable, (name, changed)
    assert {p for g in r["groups"] for p in g["parts"]} == {"projector"}
    assert all(g["n_with_state"] == g["n_params"] for g in r["groups"])
    assert r["n_state"] == sum(g["n_params"] for g in r["groups"])


def test_stage2_trains_all_parts_with_their_lrs(tmp_path):
    r = _probe(tmp_path, [
        "--training.trainable", "projector,llm,vision", "--optimizer.lr", "2e-5",
        "--optimizer.llm_lr", "2e-5", "--optimizer.projector_lr", "2e-5",
        "--optimizer.vision_lr", "2e-6", "--optimizer.weight_decay", "0.1",
    ])
    assert all(r["changed"].values()), [n for n, c in r["changed"].items() if not c]
    by_name = {g["name"]: g for g in r["groups"]}
    assert set(by_name) == {
        "llm", "llm_no_decay", "vision", "vision_no_decay", "projector", "projector_no_decay"
    }
    expected_lr = {"llm": 2e-5, "vision": 2e-6, "projector": 2e-5}
    for name, g in by_name.items():
        part = name.split("_")[0]
        assert g["parts"] == [part]
        assert g["lr"] == expected_lr[part]
        assert g["weight_decay"] == (0.0 if name.endswith("no_decay") else 0.1)
        assert g["n_with_state"] == g["n_params"] > 0


def test_frozen_parts_stored_in_bf16_train_bit_identically(tmp_path):
    """Stage 1 with bf16 compute: frozen parameters stored in bf16 ("auto") instead of fp32 give
    bit-identical losses and gradient norms (FSDP2 casts fp32 storage to bf16 for every forward
    anyway), the frozen bf16 weights stay untouched, and the trainable ones stay fp32."""
    hf = make_hf_llava(str(tmp_path / "hf"))
    common = [
        "--training.trainable", "projector", "--data.template", "plain",
        "--data.path", "tests/assets/sample_data/pretrain.json", "--optimizer.lr", "1e-3",
        "--training.mixed_precision_param", "bfloat16", "--metrics.log_freq", "1", *hf_init(hf),
    ]
    fp32 = _probe(tmp_path, common + ["--training.frozen_param_dtype", "float32"], run="fp32")
    bf16 = _probe(tmp_path, common, run="bf16")  # auto = the compute dtype
    for name, trainable in bf16["requires_grad"].items():
        assert fp32["dtypes"][name] == "float32"
        assert bf16["dtypes"][name] == ("float32" if trainable else "bfloat16"), name
        assert bf16["changed"][name] == trainable, name
    a, b = read_metrics(str(tmp_path / "fp32")), read_metrics(str(tmp_path / "bf16"))
    assert len(a) == len(b) == 3
    assert [(m["loss"], m["grad_norm"]) for m in a] == [(m["loss"], m["grad_norm"]) for m in b]
    assert a[0]["loss"] != a[-1]["loss"]  # it trained
