"""run_train.sh hands the trainer's exit status to the caller (torchrun itself reports any worker
failure as 1): 75 after a SIGTERM-triggered checkpoint, whether the signal reaches the workers or
the script, or after torchrun itself was killed (the script waits for its workers); 2 for a config
error; 3 for a non-finite step; 0 for a completed run whose worker died while exiting."""

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


def _wait_for_two_steps(proc: subprocess.Popen, dump: str) -> str:
    """Until the run has logged two steps (still running); returns its metrics.jsonl path."""
    metrics = os.path.join(dump, "metrics.jsonl")
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    return metrics


def test_sigterm_to_the_script_exits_75_with_a_checkpoint(tmp_path):
    dump = str(tmp_path / "run")
    proc = _launch(dump, "--training.steps", "500", "--checkpoint.interval", "1000")
    metrics = _wait_for_two_steps(proc, dump)
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


def test_a_non_finite_step_exits_3(tmp_path):
    """A NaN on rank 1 stops both ranks; the script exits 3 (not torchrun's 1) and repeats the
    trainer's line."""
    proc = _launch(str(tmp_path / "run"), "--training.steps", "6", "--checkpoint.enable", "false",
                   env={"TITAN_LLAVA_FAULT": "nan_loss@3@1"})
    out, _ = proc.communicate(timeout=200)
    assert proc.returncode == 3, out[-3000:]
    line = next((l for l in out.splitlines() if l.startswith("run_train.sh: ")), "")
    assert "exited with status 3: error: step 3: non-finite loss" in line, out[-3000:]


def test_torchrun_killed_outright_exits_75_once_the_workers_saved(tmp_path):
    """SIGKILL to torchrun (the OOM killer, say): its workers notice, save a checkpoint and report
    75; the script waits for them instead of exiting at once with torchrun's 137, so that a job
    script requeues, and never restarts while they still write."""
    dump = str(tmp_path / "run")
    proc = _launch(dump, "--training.steps", "1000", "--checkpoint.interval", "1000")
    metrics = _wait_for_two_steps(proc, dump)
    children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
    assert len(children) == 1, children  # torchrun
    os.kill(int(children[0]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 75, out[-3000:]
    assert "while workers still run; waiting for them to stop" in out, out[-3000:]
    last = json.loads(open(metrics).readlines()[-1])["step"]
    assert os.path.isdir(os.path.join(dump, "checkpoint", f"step-{last}"))


def test_a_dead_workers_marker_does_not_hold_the_script(tmp_path):
    """A worker killed outright leaves its alive-marker; its pid may then name another process
    (reused) or an unreaped zombie. Only a marker whose worker still holds its lock is waited for:
    here torchrun (a stand-in) leaves a marker naming a live, unrelated process and exits 137."""
    other = subprocess.Popen(["sleep", "120"])
    try:
        bindir = tmp_path / "bin"
        bindir.mkdir()
        fake = bindir / "torchrun"
        fake.write_text("#!/usr/bin/env python3\nimport os, sys\n"
                        "open(os.environ['TITAN_LLAVA_STATUS_FILE'] + f'.alive.{os.environ[\"OTHER\"]}',"
                        " 'w').close()\nsys.exit(137)\n")
        fake.chmod(0o755)
        env = {**os.environ, "OTHER": str(other.pid), "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
        start = time.time()
        proc = subprocess.run(["./run_train.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 137, proc.stderr[-2000:]
        assert time.time() - start < 20 and "waiting for them" not in proc.stderr, proc.stderr
    finally:
        other.kill()
        other.wait()


def test_a_worker_dying_after_the_run_completed_exits_0(tmp_path):
    """Status 0 is written after the final barrier: a worker that dies after it (a teardown crash,
    here SIGKILL) does not turn a completed run into a failure, and the script says what happened."""
    dump = str(tmp_path / "run")
    proc = _launch(dump, "--training.steps", "2", env={"TITAN_LLAVA_FAULT": "exit@0@1"})
    out, _ = proc.communicate(timeout=200)
    assert proc.returncode == 0, out[-3000:]
    assert "the run completed on every rank, but a worker failed while exiting" in out, out[-3000:]
    assert len(open(os.path.join(dump, "metrics.jsonl")).readlines()) >= 1


def _env_seen_by_torchrun(tmp_path, env: dict) -> dict:
    """The environment run_train.sh hands torchrun (a stand-in on PATH that records it)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(parents=True)
    record = tmp_path / "env.json"
    fake = bindir / "torchrun"
    fake.write_text("#!/usr/bin/env python3\nimport json, os\n"
                    f"json.dump(dict(os.environ), open({str(record)!r}, 'w'))\n")
    fake.chmod(0o755)
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    full_env.update(env, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["./run_train.sh"], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(record.read_text())


def test_allocator_defaults_to_expandable_segments_unless_set(tmp_path):
    seen = _env_seen_by_torchrun(tmp_path / "a", {})
    assert seen["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    # Set, even to "" (the allocator's own defaults), or under the newer name: left alone.
    seen = _env_seen_by_torchrun(tmp_path / "b", {"PYTORCH_CUDA_ALLOC_CONF": ""})
    assert seen["PYTORCH_CUDA_ALLOC_CONF"] == ""
    seen = _env_seen_by_torchrun(tmp_path / "c", {"PYTORCH_ALLOC_CONF": "max_split_size_mb:512"})
    assert seen["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:512"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in seen


def test_multi_node_without_a_rendezvous_endpoint_is_refused_at_once(tmp_path):
    # Each node would otherwise wait on a local store of its own, with no output, for minutes.
    env = {k: v for k, v in os.environ.items() if k != "RDZV_ENDPOINT"}
    proc = subprocess.run(["./run_train.sh", "--job.dump_folder", str(tmp_path)], cwd=REPO,
                          env={**env, "NNODES": "2", "NGPU": "1"}, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 2
    assert "NNODES=2 needs RDZV_ENDPOINT=host:port" in proc.stderr
