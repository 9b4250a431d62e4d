"""run_train.sh hands the trainer's exit status to the caller (torchrun itself reports any worker
failure as 1): 75 after a SIGTERM-triggered checkpoint, whether the signal reaches the workers or
the script; 2 for a config error; 0 for a completed run whose worker died while exiting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from tests.train.utils import REPO


def _launch(dump: str, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "NGPU": "2", "OMP_NUM_THREADS": "1",
                "CONFIG_FILE": "train_configs/debug_model.toml", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    return subprocess.Popen(
        ["./run_train.sh", "--job.dump_folder", dump, *overrides], cwd=REPO, env=full_env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_sigterm_to_the_script_exits_75_with_a_checkpoint(tmp_path):
    dump = str(tmp_path / "run")
    proc = _launch(dump, "--training.steps", "500", "--checkpoint.interval", "1000")
    metrics = os.path.join(dump, "metrics.jsonl")
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 75, out[-3000:]
    last = json.loads(open(metrics).readlines()[-1])["step"]
    assert os.path.isdir(os.path.join(dump, "checkpoint", f"step-{last}"))


def test_sigterm_inside_the_workers_exits_75(tmp_path):
    dump = str(tmp_path / "run")
    proc = _launch(dump, "--training.steps", "6", env={"TITAN_LLAVA_FAULT": "sigterm_accum@2"})
    out, _ = proc.communicate(timeout=200)
    assert proc.returncode == 75, out[-3000:]
    assert os.path.isdir(os.path.join(dump, "checkpoint", "step-2"))


def test_config_error_exits_2(tmp_path):
    proc = _launch(str(tmp_path / "run"), "--training.no_such_key", "1")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out[-3000:]
    # The script repeats the message itself: torchrun may stop rank 0 (the only rank shown) as soon
    # as rank 1 exits, before rank 0 has printed it.
    line = next((l for l in out.splitlines() if l.startswith("run_train.sh: ")), "")
    assert "exited with status 2" in line and "training.no_such_key" in line, out[-3000:]


def test_a_worker_dying_after_the_run_completed_exits_0(tmp_path):
    """Status 0 is written after the final barrier: a worker that dies after it (a teardown crash,
    here SIGKILL) does not turn a completed run into a failure, and the script says what happened."""
    dump = str(tmp_path / "run")
    proc = _launch(dump, "--training.steps", "2", env={"TITAN_LLAVA_FAULT": "exit@0@1"})
    out, _ = proc.communicate(timeout=200)
    assert proc.returncode == 0, out[-3000:]
    assert "the run completed on every rank, but a worker failed while exiting" in out, out[-3000:]
    assert len(open(os.path.join(dump, "metrics.jsonl")).readlines()) >= 1
