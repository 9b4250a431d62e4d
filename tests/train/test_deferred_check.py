"""A step's loss / gradient-norm check without a host sync per step: with fused AdamW the trainer
reads a step's numbers once the next step's forward/backward is queued, and a non-finite step is
skipped on the device. Same results as checking every step; a non-finite step is never applied;
SIGTERM and exact resume still hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from tests.test_checkpoint import ckpt, metrics, ok, train
from tests.train.utils import DEBUG_CONFIG, REPO
from titan_llava.checkpoint_io import FAULT_ENV, complete_steps
from titan_llava.step_check import is_sync_warning

FUSED = ["--optimizer.implementation", "fused"]
BASE = [
    "--training.steps", "6", "--training.local_batch_size", "1", "--training.global_batch_size",
    "2", "--data.max_seq_len", "2048", "--lr_scheduler.warmup_steps", "2",
    "--checkpoint.enable", "false",
]  # fmt: skip


def _probe(
    tmp_path, name: str, overrides: list[str], fault: str = "", no_defer: bool = False
) -> dict:
    out = str(tmp_path / f"{name}.json")
    cmd = [sys.executable, "-m", "tests.train.step_check_probe", out,
           "--job.config_file", DEBUG_CONFIG, "--job.dump_folder", str(tmp_path / name),
           *BASE, *overrides]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PROBE_NO_DEFER="1" if no_defer else "0", **{FAULT_ENV: fault})
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(out) as f:
        r = json.load(f)
    r["params"] = torch.load(out + ".params.pt", weights_only=True)
    return r


def test_deferred_reads_give_the_same_training(tmp_path):
    deferred = _probe(tmp_path, "deferred", [*FUSED, "--metrics.log_freq", "4"])
    assert deferred["defer_check"] and deferred["error"] is None
    # Steps 1-3 and 5 are read one step later; log step 4 and the last step in their own step.
    assert deferred["reads"] == [[1, 2], [2, 3], [3, 4], [4, 4], [5, 6], [6, 6]]
    every = _probe(tmp_path, "every", [*FUSED, "--metrics.log_freq", "1"])
    assert every["reads"] == [[s, s] for s in range(1, 7)]
    # Fused AdamW without found_inf at all, every step read before its update.
    plain = _probe(tmp_path, "plain", [*FUSED, "--metrics.log_freq", "4"], no_defer=True)
    assert not plain["defer_check"] and plain["reads"] == every["reads"]
    # foreach AdamW cannot skip on the device: its numbers are read before its update.
    foreach = _probe(tmp_path, "foreach", ["--optimizer.implementation", "foreach",
                                           "--metrics.log_freq", "4"])  # fmt: skip
    assert not foreach["defer_check"] and foreach["reads"] == every["reads"]
    for name, p in every["params"].items():
        assert torch.equal(deferred["params"][name], p), name
        assert torch.equal(plain["params"][name], p), name
    # fused and foreach AdamW differ in rounding only: the runs are the same training.
    for name, p in foreach["params"].items():
        torch.testing.assert_close(deferred["params"][name], p, rtol=1e-4, atol=1e-6)


def test_non_finite_step_is_never_applied(tmp_path):
    for impl, read_during in (("fused", 4), ("foreach", 3)):
        r = _probe(tmp_path, impl, ["--optimizer.implementation", impl, "--metrics.log_freq", "5"],
                   fault="nan_loss@3")  # fmt: skip
        assert r["error"] is not None and r["error"].startswith("step 3: non-finite loss"), r
        assert "the parameters are those after step 2" in r["error"]
        # fused: step 3's numbers are read during step 4, after step 3's update was skipped on
        # the device (found_inf) and before step 4's; foreach: during step 3, before its update.
        assert r["reads"][-1] == [3, read_during], r["reads"]
        assert r["final_finite"]
        # The parameters and AdamW state (moments, step count) are exactly those step 3 started
        # from (and, fused, step 4 too).
        assert r["final_equals_start_of"] == list(range(3, read_during + 1)), r


def test_a_non_finite_step_exits_3_naming_the_newest_checkpoint(tmp_path):
    """What the user sees: status 3 (not a crash's 1, not the requeue status 75) and one error
    line with the step and the newest complete checkpoint, no traceback. An asynchronous save
    still in flight (step 2's: with deferred checks it is published at the next log or save
    step) is published first, not left a .tmp folder. With checkpointing off the line says a
    rerun starts over."""
    dump = str(tmp_path / "ck")
    p = train(dump, *FUSED, *BASE, "--checkpoint.enable", "true", "--checkpoint.interval", "2",
              "--checkpoint.async_mode", "async", "--metrics.log_freq", "5",
              fault="nan_loss@3")  # fmt: skip
    ok(p, 3)
    errors = [l for l in p.stderr.splitlines() if l.startswith("titan_llava.train: error: ")]
    assert len(errors) == 1, p.stderr[-4000:]
    assert "step 3: non-finite loss" in errors[0], errors
    assert f"The newest complete checkpoint is {os.path.join(ckpt(dump), 'step-2')};" in errors[0]
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    assert complete_steps(ckpt(dump)) == ([2], [])
    p = train(str(tmp_path / "off"), *FUSED, *BASE, "--metrics.log_freq", "5", fault="nan_loss@3")
    ok(p, 3)
    assert "No checkpoint of this run exists (a rerun starts over)" in p.stderr, p.stderr[-4000:]


def test_sigterm_and_exact_resume_with_deferred_reads(tmp_path):
    run = [*FUSED, "--training.steps", "8", "--training.local_batch_size", "1",
           "--training.global_batch_size", "3", "--data.max_seq_len", "2048",
           "--lr_scheduler.warmup_steps", "3", "--metrics.log_freq", "4",
           "--checkpoint.enable", "true", "--checkpoint.interval", "6",
           "--checkpoint.keep_latest_k", "0"]  # fmt: skip
    straight = str(tmp_path / "straight")
    ok(train(straight, *run))
    assert sorted(metrics(straight)) == [4, 8]
    assert complete_steps(ckpt(straight)) == ([6, 8], [])
    dump = str(tmp_path / "preempted")
    # SIGTERM during step 2: its flag is read during step 3, which is then checked at once, saved,
    # and the run exits with the preemption status.
    p = train(dump, *run, fault="sigterm_accum@2")
    ok(p, 75)
    assert "SIGTERM: checkpoint of step 3 saved" in p.stderr, p.stderr[-3000:]
    assert complete_steps(ckpt(dump)) == ([3], [])
    ok(train(dump, *run))
    resumed = metrics(dump)
    assert sorted(resumed) == [4, 8]
    for step in (4, 8):
        assert resumed[step] == metrics(straight)[step], step


def test_sigterm_with_checkpointing_off_says_nothing_was_saved(tmp_path):
    """SIGTERM stops the run at a step boundary either way; with checkpoint.enable false nothing
    is saved, so the run says so and exits 143, not 75 (which asks a job script to requeue)."""
    dump = str(tmp_path)
    p = train(dump, *FUSED, *BASE, fault="sigterm_accum@2")  # BASE: checkpoint.enable false
    ok(p, 143)
    assert "checkpoint.enable is false, so nothing was saved" in p.stderr, p.stderr[-3000:]
    assert "checkpoint of step" not in p.stderr
    assert not os.path.exists(ckpt(dump))


def test_non_finite_on_one_rank_skips_on_every_rank(tmp_path):
    dump = str(tmp_path)
    p = train(dump, *FUSED, *BASE, "--metrics.log_freq", "5", nproc=2, fault="nan_loss@3@1")
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert out.count("step 3: non-finite loss") >= 2, out[-4000:]
    assert not os.path.exists(os.path.join(dump, "metrics.jsonl")) or not metrics(dump)


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    dump = str(tmp_path)
    ckpt_args = ["--checkpoint.enable", "true", "--checkpoint.interval", "100"]
    # BASE disables checkpoints; the later flags win.
    p = train(dump, *FUSED, *BASE, *ckpt_args, "--metrics.log_freq", "5", nproc=2,
              fault="sigterm_accum@2@1")  # fmt: skip
    # torchrun reports 1 for the workers' 75 (run_train.sh passes 75 through; tested there).
    assert p.returncode != 0
    # Rank 1's flag (step 2) is read by both ranks during step 3: both save step 3 (a complete
    # checkpoint needs every rank's part) and stop. (Only the count of messages can vary: torchrun
    # may stop one rank before it prints.)
    out = p.stdout + p.stderr
    assert "SIGTERM: checkpoint of step 3 saved; exiting with status 75" in out, out[-3000:]
    assert complete_steps(ckpt(dump)) == ([3], [])


def test_only_a_synchronizing_operation_counts_as_a_sync():
    """Sync-debug mode's warning for a sync counts; its one-time notice on being turned on (torch
    2.11-2.13 text), which round 7's probe counted as step 1's sync, does not."""
    assert is_sync_warning(UserWarning("called a synchronizing CUDA operation"))
    assert not is_sync_warning(UserWarning(
        "Synchronization debug mode is a prototype feature and does not yet detect all "
        "synchronizing operations"))
