"""Stage 1 trains only the projector (+ image_newline); stage 2 trains all three parts with their
own learning rates; frozen parts get neither gradients nor optimizer state."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.train.utils import DEBUG_CONFIG, REPO


def _probe(tmp_path, overrides: list[str]) -> dict:
    out = str(tmp_path / "probe.json")
    cmd = [
        sys.executable, "-m", "tests.train.stage_probe", out,
        "--job.config_file", DEBUG_CONFIG, "--job.dump_folder", str(tmp_path / "run"),
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
