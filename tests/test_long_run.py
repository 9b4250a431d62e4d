"""What a long run with many restarts accumulates: metrics.jsonl stays one record per step after
SIGKILL-resume cycles, and a SIGKILLed torchrun does not leave its workers training on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.test_checkpoint import RUN, ok, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _steps(dump: str) -> list[int]:
    with open(os.path.join(dump, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_metrics_have_one_record_per_step_after_kill_resume(tmp_path):
    dump = str(tmp_path)
    ok(train(dump, *RUN, fault="accum@4"), -9)  # steps 1-3 logged, checkpoint 2: step 3 replayed
    assert _steps(dump) == [1, 2, 3]
    ok(train(dump, *RUN))
    assert _steps(dump) == list(range(1, 9))
    with open(os.path.join(dump, "metrics.superseded.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [3]


def test_workers_stop_with_a_checkpoint_when_torchrun_is_killed(tmp_path):
    dump = str(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "titan_llava.train", "--job.config_file", os.path.join(ROOT, "train_configs", "debug_model.toml"),
           "--job.dump_folder", dump, "--training.steps", "1000", "--checkpoint.interval", "1000"]  # fmt: skip
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(dump, "metrics.jsonl")
    deadline = time.time() + 180
    while time.time() < deadline and not (os.path.exists(metrics) and len(_steps(dump)) >= 2):
        time.sleep(0.5)
    workers = [int(p) for p in open(f"/proc/{agent.pid}/task/{agent.pid}/children").read().split()]
    assert len(workers) == 2
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    deadline = time.time() + 120
    while time.time() < deadline and any(os.path.exists(f"/proc/{w}") for w in workers):
        time.sleep(0.5)
    alive = [w for w in workers if os.path.exists(f"/proc/{w}")]
    for w in alive:  # do not leave them behind if the test fails
        os.kill(w, signal.SIGKILL)
    assert not alive, "the workers kept running after torchrun was killed"
    last = _steps(dump)[-1]
    assert os.path.isdir(os.path.join(dump, "checkpoint", f"step-{last}"))
