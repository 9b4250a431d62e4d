"""DeviceMemory: the caching allocator's peak and retries per log interval, and how the metrics
show them. CUDA's memory functions are stood in for (the suite runs on CPU)."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch

from titan_llava.metrics import DeviceMemory, MetricsLogger


@pytest.fixture
def fake_cuda(monkeypatch):
    state = {"retries": 3, "peak_bytes": 0, "resets": 0}
    monkeypatch.setattr(torch.cuda, "memory_stats",
                        lambda device: {"num_alloc_retries": state["retries"], "other": 1})
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: state["peak_bytes"])

    def reset(device):
        state["resets"] += 1
        state["peak_bytes"] = 0

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    return state


def test_retries_are_counted_per_interval_and_warned_once(fake_cuda, caplog):
    mem = DeviceMemory("cuda:0")  # 3 retries before training: not this run's intervals
    fake_cuda["peak_bytes"] = 2 * 2**30
    assert mem.interval() == (2.0, 0)
    assert fake_cuda["resets"] == 1 and not mem.warned
    fake_cuda["retries"], fake_cuda["peak_bytes"] = 8, 3 * 2**30
    with caplog.at_level(logging.WARNING, logger="titan_llava.metrics"):
        assert mem.interval() == (3.0, 5)
        fake_cuda["retries"] = 9
        assert mem.interval() == (0.0, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "retried 5 allocation(s)" in warnings[0] and "expandable_segments:True" in warnings[0]


def test_no_cuda_no_figures():
    assert DeviceMemory("cpu").interval() == (None, None)


def test_retries_in_the_record_and_the_progress_line(tmp_path):
    out = io.StringIO()
    ml = MetricsLogger(str(tmp_path), total_steps=10, stream=out)
    common = dict(loss=1.0, grad_norm=1.0, lr=1e-4, interval_s=1.0, steps_in_interval=1,
                  tokens=10, text_tokens=10, image_tokens=0, samples=1, flops=1.0,
                  data_wait_s=0.0, memory_gib=40.0)
    ml.log(1, alloc_retries=4, **common)
    ml.log(2, alloc_retries=0, **common)
    ml.log(3, **common)
    ml.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["alloc_retries"] for r in records] == [4, 0, None]
    lines = out.getvalue().splitlines()
    assert "alloc retries 4" in lines[0]
    assert "alloc retries" not in lines[1] and "alloc retries" not in lines[2]


def test_trainer_logs_retries_summed_over_ranks(tmp_path):
    """The trainer's wiring, on 2 gloo ranks: each rank's retries (stood in for: rank r reports
    r + 1 per interval) are summed into every logged step's `alloc_retries`; the memory figure is
    the rank's own."""
    import os
    import subprocess
    import sys

    from tests.train.utils import DEBUG_CONFIG, REPO, read_metrics

    dump = str(tmp_path / "run")
    script = tmp_path / "run.py"
    script.write_text(
        "import torch.distributed as dist\n"
        "from titan_llava import metrics\n"
        "from titan_llava.config import load_config\n"
        "from titan_llava.trainer import Trainer\n"
        "metrics.DeviceMemory.interval = lambda self: (1.5, dist.get_rank() + 1)\n"
        f"t = Trainer(load_config(['--job.config_file', {DEBUG_CONFIG!r}, '--job.dump_folder', "
        f"{dump!r}, '--training.steps', '2', '--metrics.log_freq', '1', "
        "'--checkpoint.enable', 'false']))\n"
        "t.train()\n"
        "t.close()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_metrics(dump)
    assert [r["step"] for r in records] == [1, 2]
    assert [r["alloc_retries"] for r in records] == [3, 3]
    assert [r["memory_gib"] for r in records] == [1.5, 1.5]
    assert "alloc retries 3" in proc.stdout + proc.stderr


def _record(step: int) -> str:
    return json.dumps({"step": step, "loss": float(step)}) + "\n"


def test_resume_moves_replayed_records_aside(tmp_path):
    """A crash after step 7 with the newest checkpoint at 5: steps 6-7 are replayed, so their first
    records (and the torn line the crash left) must not stay in metrics.jsonl."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(_record(s) for s in range(1, 8)) + '{"step": 8, "lo')
    ml = MetricsLogger(str(tmp_path), total_steps=10, stream=io.StringIO())
    ml.resume(5)
    common = dict(loss=1.0, grad_norm=1.0, lr=1e-4, interval_s=1.0, steps_in_interval=1,
                  tokens=10, text_tokens=10, image_tokens=0, samples=1, flops=1.0, data_wait_s=0.0)
    ml.log(6, **common)
    ml.close()
    steps = [json.loads(x)["step"] for x in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    aside = [json.loads(x)["step"] for x in (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()]
    assert aside == [6, 7]


def test_wandb_run_continues_across_restarts(tmp_path, monkeypatch):
    import sys
    import types

    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or types.SimpleNamespace(finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for _ in range(2):  # two starts of the same run (a requeue)
        MetricsLogger(str(tmp_path), total_steps=10, enable_wandb=True, stream=io.StringIO()).close()
    assert calls[0]["id"] and calls[0]["id"] == calls[1]["id"]
    assert calls[0]["resume"] == "allow"
