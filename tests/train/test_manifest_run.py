"""`data.manifest = true`: every rank records the sample ids of every step; a run killed after a
checkpoint and restarted ends with each step listed once and exactly the ids of a straight run."""

from __future__ import annotations

import json
import os

from titan_llava.data.manifest import check_manifest
from tests.train.utils import run_train

COMMON = [
    "--training.steps", "6", "--training.local_batch_size", "1",
    "--training.global_batch_size", "2", "--data.manifest", "true",
    "--checkpoint.enable", "true", "--checkpoint.interval", "2",
    "--lr_scheduler.warmup_steps", "0",
]


def _read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_manifest_after_kill_and_resume_equals_straight_run(tmp_path):
    straight = str(tmp_path / "straight")
    run_train(straight, COMMON, nproc=2)
    crashed = str(tmp_path / "crashed")
    # SIGKILL in step 6: step 5 is already in the manifest but not in a checkpoint (the last is
    # step 4), so the restart must drop its lines and replay it.
    proc = run_train(crashed, COMMON, nproc=2, check=False, env={"TITAN_LLAVA_FAULT": "accum@6"})
    assert proc.returncode != 0
    run_train(crashed, COMMON, nproc=2)
    for rank in (0, 1):
        a = os.path.join(straight, "manifest", f"rank{rank}.jsonl")
        b = os.path.join(crashed, "manifest", f"rank{rank}.jsonl")
        report = check_manifest(b)
        assert report.ok, report
        assert report.steps == [1, 2, 3, 4, 5, 6]
        assert _read(a) == _read(b)
    # The two ranks saw disjoint samples.
    ids = [set(i for e in _read(os.path.join(straight, "manifest", f"rank{r}.jsonl"))
               for i in e["ids"]) for r in (0, 1)]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
