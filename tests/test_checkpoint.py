"""Checkpoints, one process: crash / preemption / crash-during-save resume is bit-identical to a
straight run; stage 1 -> stage 2 chaining; the folder rules and the safe (pickle-free) reader."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from titan_llava.checkpoint_io import (
    COMPLETE_MARKER,
    FAULT_ENV,
    TensorOnlyLoadPlanner,
    complete_steps,
    fault_point,
    read_metadata,
    resolve_step_dir,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "train_configs", "debug_model.toml")
# 20 samples, 3 rows per step -> the data wraps into epoch 1 during step 7 (checkpoint 8 is past it).
# A checkpoint every 2 steps keeps the work redone after each crash small.
RUN = [
    "--training.steps", "8", "--training.local_batch_size", "1",
    "--training.global_batch_size", "3", "--training.mixed_precision_param", "float32",
    "--checkpoint.enable", "true", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0",
    "--data.max_seq_len", "2048", "--lr_scheduler.warmup_steps", "3",
]  # fmt: skip
PREEMPTED = 75


def train(dump: str, *extra: str, fault: str = "", nproc: int = 1, timeout: int = 300):
    """Run the trainer as a user would (a subprocess); returns the CompletedProcess."""
    env = {**os.environ, FAULT_ENV: fault, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "titan_llava.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "titan_llava.train"]  # fmt: skip
    cmd += ["--job.config_file", CONFIG, "--job.dump_folder", dump, *extra]
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def metrics(dump: str) -> dict[int, list[tuple[float, float, float]]]:
    """step -> every logged (loss, grad_norm, lr) of that step, over all runs in the folder."""
    out: dict[int, list] = {}
    with open(os.path.join(dump, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out.setdefault(r["step"], []).append((r["loss"], r["grad_norm"], r["lr"]))
    return out


def assert_same_history(resumed: dict, straight: dict, steps: int) -> None:
    assert sorted(resumed) == list(range(1, steps + 1))
    for step, records in resumed.items():
        for rec in records:  # every run that logged this step logged exactly the straight numbers
            assert rec == straight[step][0], (step, rec, straight[step][0])


def ok(p: subprocess.CompletedProcess, rc: int = 0) -> None:
    assert p.returncode == rc, f"exit {p.returncode} != {rc}\n{p.stderr[-4000:]}"


def ckpt(dump: str) -> str:
    return os.path.join(dump, "checkpoint")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> tuple[str, dict]:
    dump = str(tmp_path_factory.mktemp("straight"))
    ok(train(dump, *RUN))
    hist = metrics(dump)
    assert sorted(hist) == list(range(1, 9)) and all(len(v) == 1 for v in hist.values())
    assert complete_steps(ckpt(dump)) == ([2, 4, 6, 8], [])
    return dump, hist


@pytest.fixture(scope="module")
def straight(straight_run) -> dict:
    return straight_run[1]


def test_kill_crash_during_save_sigterm_resume_bit_identical(tmp_path, straight_run):
    dump, (straight_dump, straight) = str(tmp_path), straight_run
    # SIGKILL in the middle of step 3's gradient accumulation (after checkpoint 2).
    ok(train(dump, *RUN, fault="accum@3"), -9)
    assert complete_steps(ckpt(dump)) == ([2], [])
    # Resume; SIGKILL after marker, before the rename of step 4: step-4 never appears.
    ok(train(dump, *RUN, fault="before_rename@4"), -9)
    assert complete_steps(ckpt(dump)) == ([2], [".step-4.tmp"])
    assert os.path.exists(os.path.join(ckpt(dump), ".step-4.tmp", COMPLETE_MARKER))
    # Resume (the half-written folder is reported, step 2 is picked); SIGKILL while/after the
    # shards are written, before the marker.
    p = train(dump, *RUN, fault="shards_written@4")
    ok(p, -9)
    assert "ignoring incomplete checkpoint" in p.stderr and "step-2 (step 2" in p.stderr
    # Resume; SIGTERM during step 6: checkpoint 6 and a clean exit with the documented status
    # (the crashed leftovers of step 4 are replaced and pruned).
    p = train(dump, *RUN, fault="sigterm_accum@6")
    ok(p, PREEMPTED)
    assert complete_steps(ckpt(dump)) == ([2, 4, 6], [])
    assert max(metrics(dump)) == 6
    # Resume from 6 to the end.
    p = train(dump, *RUN)
    ok(p)
    assert "step-6 (step 6" in p.stderr
    assert_same_history(metrics(dump), straight, 8)
    # The epoch wrapped before checkpoint 8 (its data state is in epoch 1).
    blob = _read(os.path.join(ckpt(dump), "step-8"), "dataloader.dp_rank_0")
    assert json.loads(bytes(blob.tolist()))["sampler"]["epoch"] == 1
    # The token count carried over the resumes (not restarted from the resumed step).
    tokens = [_read(os.path.join(ckpt(d), "step-8"), "train_state.tokens_seen").item()
              for d in (dump, straight_dump)]  # fmt: skip
    assert tokens[0] == tokens[1] > 0


def test_crash_at_save_begin_then_async_resume(tmp_path, straight):
    dump = str(tmp_path)
    # Step 2 is saved asynchronously and published when step 4's save begins; then the crash.
    ok(train(dump, *RUN, "--checkpoint.async_mode", "async", fault="save_begin@4"), -9)
    assert complete_steps(ckpt(dump)) == ([2], [".step-4.tmp"])
    ok(train(dump, *RUN, "--checkpoint.async_mode", "async", "--checkpoint.keep_latest_k", "2"))
    assert_same_history(metrics(dump), straight, 8)
    # keep_latest_k = 2 and the crashed leftovers pruned.
    assert complete_steps(ckpt(dump)) == ([6, 8], [])


def _read(step_dir: str, fqn: str) -> torch.Tensor:
    meta = read_metadata(step_dir, "test").state_dict_metadata[fqn]
    t = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    dcp.load({fqn: t}, checkpoint_id=step_dir, no_dist=True)
    return t


def _full_model(step_dir: str) -> dict[str, torch.Tensor]:
    meta = read_metadata(step_dir, "test").state_dict_metadata
    return {k[len("model.") :]: _read(step_dir, k) for k in meta if k.startswith("model.")}


def test_stage1_to_stage2_chain(tmp_path):
    # Stage 1 computes in bf16, so its frozen parts are stored (and saved) in bf16; stage 2 loads
    # them into fp32 parameters (the reference also starts stage 2 from bf16-loaded weights).
    stage1 = ["--training.trainable", '["projector"]', "--training.mixed_precision_param", "bfloat16"]
    s1 = str(tmp_path / "s1")
    ok(train(s1, *RUN, "--training.steps", "3", *stage1))
    w1 = _full_model(os.path.join(ckpt(s1), "step-3"))
    for k, v in w1.items():
        assert v.dtype == (torch.float32 if k.startswith(("projector.", "image_newline")) else torch.bfloat16), k
    starts = _start_weights(
        tmp_path,
        init=stage1,
        s2=["--training.trainable", '["projector","llm","vision"]',
            "--checkpoint.initial_load_path", os.path.join(ckpt(s1), "step-3"),
            "--checkpoint.initial_load_model_only", "true"],
    )  # fmt: skip
    init, w2 = starts["init"], starts["s2"]
    assert w1.keys() == w2.keys() == init.keys()
    for k in w1:
        assert w2[k].dtype == torch.float32, k
        assert torch.equal(w2[k], w1[k].float()), k  # stage 2 starts from stage 1's last weights
        if k.startswith(("language_model.", "vision_tower.")):
            assert torch.equal(w2[k], init[k]), k  # frozen in stage 1: the initial weights
    changed = [k for k in w1 if k.startswith("projector.") and not torch.equal(w1[k], init[k])]
    assert changed, "stage 1 did not train the projector: the chain test would prove nothing"


def _start_weights(tmp_path, **runs: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The weights each run starts from (step 0: after init and initial loads), taken from the
    trainer's model and written with torch.save (no checkpoint code); one process builds the
    runs' trainers in turn (each re-seeds), so the interpreter start is paid once."""
    out = str(tmp_path / "start_weights.pt")
    argvs = {
        name: ["--job.config_file", CONFIG, "--job.dump_folder", str(tmp_path / name), *RUN, *o]
        for name, o in runs.items()
    }
    code = (
        "import torch; from titan_llava.config import load_config; "
        "from titan_llava.trainer import Trainer\n"
        "full = lambda v: (v.full_tensor() if hasattr(v, 'full_tensor') else v).detach().clone()\n"
        "res = {}\n"
        f"for name, argv in {argvs!r}.items():\n"
        "    t = Trainer(load_config(argv))\n"
        "    res[name] = {k: full(v) for k, v in t.model.state_dict().items()}\n"
        "    t.close()\n"
        f"torch.save(res, {out!r})"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120, check=False)  # fmt: skip
    ok(p)
    return torch.load(out, weights_only=True)


# ----- folder rules and the safe reader (no subprocess) -----
def test_complete_steps_and_resolve(tmp_path):
    for name, marker in (("step-2", True), ("step-10", True), ("step-12", False),
                         (".step-14.tmp", True), ("other", True)):  # fmt: skip
        d = tmp_path / name
        d.mkdir()
        (d / ".metadata").write_bytes(b"")
        if marker:
            (d / COMPLETE_MARKER).write_text("{}")
    assert complete_steps(str(tmp_path)) == ([2, 10], [".step-14.tmp", "step-12"])
    # The marker without DCP's metadata (a partial copy of a folder) is not a checkpoint either.
    (tmp_path / "step-16").mkdir()
    (tmp_path / "step-16" / COMPLETE_MARKER).write_text("{}")
    assert complete_steps(str(tmp_path)) == ([2, 10], [".step-14.tmp", "step-12", "step-16"])
    assert resolve_step_dir(str(tmp_path), "k") == str(tmp_path / "step-10")
    with pytest.raises(ValueError, match="initial_load_path"):
        resolve_step_dir(str(tmp_path / "step-12"), "checkpoint.initial_load_path")


def test_fault_point_parsing(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "accum@6, nan_loss@3@1")
    assert fault_point("accum", 6, 0) and fault_point("accum", 6, 1)
    assert not fault_point("accum", 5, 0)
    assert fault_point("nan_loss", 3, 1) and not fault_point("nan_loss", 3, 0)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_metadata_unpickler_refuses_foreign_classes(tmp_path):
    d = tmp_path / "step-1"
    d.mkdir()
    (d / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ValueError, match="refused"):
        read_metadata(str(d), "checkpoint.initial_load_path")
    # A call of a torch function (torch.random.manual_seed(0), written by hand: libraries may
    # wrap torch.manual_seed): torch's modules are not DCP's, so not admitted either.
    (d / ".metadata").write_bytes(b"ctorch.random\nmanual_seed\n(I0\ntR.")
    with pytest.raises(ValueError, match=r"torch\.random\.manual_seed: refused"):
        read_metadata(str(d), "checkpoint.initial_load_path")


def test_pickled_entries_are_refused(tmp_path):
    step = str(tmp_path / "step-1")
    dcp.save({"x": torch.ones(2), "obj": {"a": [1, 2]}}, checkpoint_id=step, no_dist=True)
    read_metadata(step, "k")  # DCP's own metadata passes the restricted unpickler
    x = torch.zeros(2)
    dcp.load({"x": x}, checkpoint_id=step, planner=TensorOnlyLoadPlanner(), no_dist=True)
    assert torch.equal(x, torch.ones(2))
    with pytest.raises(BaseException) as err:  # DCP wraps the planner's ValueError per rank
        dcp.load({"obj": {"a": None}}, checkpoint_id=step, planner=TensorOnlyLoadPlanner(),
                 no_dist=True)  # fmt: skip
    assert "is a pickled object, not a tensor: refused" in str(getattr(err.value, "failures", err))


def test_sigterm_during_setup_stops_after_the_first_step_and_saves(tmp_path, straight):
    """A preemption notice while the run is still setting up (indexing, loading weights) is kept
    for the first step: that step is saved and the exit says "requeue" (75), not a crash (1)."""
    dump = str(tmp_path)
    p = train(dump, *RUN, fault="sigterm_setup@0")
    ok(p, PREEMPTED)
    assert "SIGTERM during set-up" in p.stderr
    assert complete_steps(ckpt(dump)) == ([], [])  # nothing trained: nothing to save
    assert not os.path.exists(os.path.join(dump, "metrics.jsonl"))


def test_async_save_is_published_once_written_not_at_the_next_save(tmp_path, straight):
    """An asynchronous save becomes loadable as soon as every rank has written it (polled at each
    step's end), so a crash before the next save resumes from it, not from the one before. (Steps
    5-7 each poll the upload of step 4; the old rule published it only when step 8's save began.)"""
    dump = str(tmp_path)
    every4 = [*RUN, "--checkpoint.async_mode", "async", "--checkpoint.interval", "4"]
    ok(train(dump, *every4, fault="accum@8"), -9)
    assert complete_steps(ckpt(dump))[0] == [4]
    p = train(dump, *every4)
    ok(p)
    assert "step-4 (step 4" in p.stderr
    assert_same_history(metrics(dump), straight, 8)


def test_async_poll_publishes_only_a_finished_upload():
    """_poll_inflight: nothing while the upload runs, the publication once it is done (one rank;
    the ranks agree through a MIN all-reduce)."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from titan_llava.checkpoint import CheckpointManager

    published = []
    upload = Future()
    manager = SimpleNamespace(_inflight=(4, upload), _poll_pg=None,
                              _finalize_inflight=lambda: published.append(4))
    CheckpointManager._poll_inflight(manager)
    assert published == []
    upload.set_result(None)
    CheckpointManager._poll_inflight(manager)
    assert published == [4]
    manager._inflight = (6, None)  # a blocking save: published by save() itself
    CheckpointManager._poll_inflight(manager)
    assert published == [4]


def test_resume_follows_this_runs_schedule_and_refuses_other_data_or_trainables(tmp_path, straight):
    """A resumed run's learning rates come from its own config: a run extended from 4 to 8 steps
    takes the 8-step schedule's rates from step 5 on (not the 4-step cosine's final 0), and a
    changed optimizer.lr applies with a warning. A data file with the same number of records in
    another order, or another training.trainable, is refused (exit 2) naming what changed."""
    dump = str(tmp_path / "extended")
    ok(train(dump, *RUN, "--training.steps", "4"))
    p = train(dump, *RUN)
    ok(p)
    # The 8-step cosine's rate at step 4 is not the 4-step one's: said, not refused.
    assert "the learning rates at step 4 differ from the checkpoint's" in p.stderr, p.stderr[-3000:]
    lrs = {step: recs[-1][2] for step, recs in metrics(dump).items()}
    assert [lrs[s] for s in range(5, 9)] == [straight[s][0][2] for s in range(5, 9)]
    assert lrs[5] > 0
    p = train(dump, *RUN)  # an unchanged resume (of the finished run): no warning
    ok(p)
    assert "differ from the checkpoint's" not in p.stderr, p.stderr[-3000:]

    # The same 4-step start, resumed to 8 steps with twice the base lr: twice the 8-step rates.
    dump = str(tmp_path / "changed_lr")
    shutil.copytree(str(tmp_path / "extended"), dump)
    shutil.rmtree(os.path.join(dump, "checkpoint", "step-6"))
    shutil.rmtree(os.path.join(dump, "checkpoint", "step-8"))
    p = train(dump, *RUN, "--optimizer.lr", "2e-3")
    ok(p)
    assert "optimizer learning rates [0.002" in p.stderr, p.stderr[-3000:]
    assert "the learning rates at step" not in p.stderr  # one warning for one cause
    lrs = {step: recs[-1][2] for step, recs in metrics(dump).items()}
    for step in range(5, 9):
        assert lrs[step] == pytest.approx(2 * straight[step][0][2], rel=1e-12)

    with open(os.path.join(ROOT, "tests", "assets", "sample_data", "finetune.json")) as f:
        records = json.load(f)
    reordered = tmp_path / "reordered.json"
    reordered.write_text(json.dumps(records[::-1]))
    p = train(dump, *RUN, "--data.path", str(reordered))
    ok(p, 2)
    assert "sample_ids_digest" in p.stderr
    with open(os.path.join(dump, "config.json")) as f:  # a refused resume leaves the run's record
        assert json.load(f)["data"]["path"] != str(reordered)
    p = train(dump, *RUN, "--training.trainable", '["projector"]')
    ok(p, 2)
    assert "training.trainable" in p.stderr


def test_a_step_folder_is_unmarked_before_it_is_deleted(tmp_path, monkeypatch):
    """Deleting a step folder takes its completion marker first: a kill in the middle of the
    deletion (rmtree goes in directory order, shards first on ext4) never leaves a folder that
    looks complete without its shards."""
    from titan_llava import checkpoint_io

    folder = tmp_path / "checkpoint" / "step-6"
    folder.mkdir(parents=True)
    for name in ("__0_0.distcp", ".metadata", COMPLETE_MARKER):
        (folder / name).write_text("x")
    assert complete_steps(str(tmp_path / "checkpoint")) == ([6], [])
    monkeypatch.setattr(checkpoint_io.shutil, "rmtree", lambda *a, **k: None)  # killed before it ran
    checkpoint_io.discard_step_dir(str(folder))
    assert complete_steps(str(tmp_path / "checkpoint"))[0] == []


def test_load_step_branches_once_and_requeues_resume_the_branch(tmp_path, straight):
    """checkpoint.load_step = 4 in a folder that reaches step 8: the first start moves steps 6 and
    8 aside (so pruning cannot prefer them to the branch's own), and the same command started
    again after a preemption resumes the branch's newest checkpoint, not step 4 again."""
    dump = str(tmp_path)
    ok(train(dump, *RUN))
    branch = [*RUN, "--checkpoint.load_step", "4", "--checkpoint.keep_latest_k", "1"]
    p = train(dump, *branch, fault="sigterm_accum@6")
    ok(p, PREEMPTED)
    assert "moved to" in p.stderr
    assert complete_steps(ckpt(dump)) == ([6], [])  # the branch's step 6, pruned to the newest
    (abandoned,) = [n for n in os.listdir(ckpt(dump)) if n.startswith("abandoned-after-step-4-")]
    assert complete_steps(os.path.join(ckpt(dump), abandoned))[0] == [6, 8]
    p = train(dump, *branch)
    ok(p)
    assert "resuming its branch from step 6" in p.stderr
    assert complete_steps(ckpt(dump)) == ([8], [])
    assert_same_history(metrics(dump), straight, 8)  # the branch repeats the same trajectory
    # Another branch point is applied afresh (and step 2 is gone, pruned: a clear error).
    p = train(dump, *RUN, "--checkpoint.load_step", "2")
    ok(p, 2)
    assert "checkpoint.load_step = 2" in p.stderr
    # Refused before anything moved: the run's checkpoints are where they were.
    assert "has no complete checkpoint of that step" in p.stderr and "moved to" not in p.stderr
    assert complete_steps(ckpt(dump)) == ([8], [])


def test_sigterm_during_a_save_stops_with_that_checkpoint(tmp_path, straight):
    """A preemption notice that arrives while checkpoint 4 is being written stops the run right
    after it (exit 75), instead of training step 5 and writing checkpoint 5 inside the grace
    period; the resume is exact."""
    dump = str(tmp_path)
    p = train(dump, *RUN, fault="sigterm_save@4")
    ok(p, PREEMPTED)
    assert complete_steps(ckpt(dump)) == ([2, 4], [])
    assert max(metrics(dump)) == 4
    ok(train(dump, *RUN))
    assert_same_history(metrics(dump), straight, 8)


def test_pad_mode_resumes_though_image_newline_never_had_a_gradient(tmp_path):
    """In pad/resize mode image_newline is trainable but never used, so AdamW holds no state for
    it: a resume must load the rest (not call it a changed training.trainable) and stay exact."""
    pad = [*RUN, "--model.image_aspect_ratio", "pad", "--training.steps", "4"]
    straight_dump = str(tmp_path / "straight")
    ok(train(straight_dump, *pad, "--checkpoint.enable", "false"))
    dump = str(tmp_path / "run")
    ok(train(dump, *pad, fault="accum@3"), -9)
    ok(train(dump, *pad))
    assert_same_history(metrics(dump), metrics(straight_dump), 4)


def _step_dir(folder, name: str, marker: bool, shard: str = "shard") -> None:
    d = folder / name
    d.mkdir(parents=True)
    (d / ".metadata").write_text("m")
    (d / "__0_0.distcp").write_text(shard)
    if marker:
        (d / COMPLETE_MARKER).write_text("{}")


def test_prune_removes_crash_leftovers_and_keeps_the_newest_k(tmp_path):
    """After a save: every temporary or unmarked step folder (crashed saves, an interrupted
    deletion) is deleted, and of the complete ones the newest keep_latest_k stay."""
    from types import SimpleNamespace

    from titan_llava.checkpoint import CheckpointManager

    folder = tmp_path / "checkpoint"
    for step in (2, 4, 6, 8):
        _step_dir(folder, f"step-{step}", marker=True)
    _step_dir(folder, ".step-10.tmp", marker=False)
    _step_dir(folder, "step-5", marker=False)
    (folder / "notes.txt").write_text("the user's")
    manager = SimpleNamespace(folder=str(folder), ck=SimpleNamespace(keep_latest_k=2))
    CheckpointManager._prune(manager)
    assert complete_steps(str(folder)) == ([6, 8], [])
    assert sorted(os.listdir(folder)) == ["notes.txt", "step-6", "step-8"]


def test_publishing_replaces_a_leftover_folder_of_the_same_step(tmp_path):
    """An unmarked step-6 left by a deletion that was killed midway is replaced when step 6 is
    saved again (a rename onto it would fail), and nothing of it survives."""
    from types import SimpleNamespace

    from titan_llava.checkpoint import CheckpointManager

    folder = tmp_path / "checkpoint"
    _step_dir(folder, "step-6", marker=False, shard="old")
    (folder / "step-6" / "__1_0.distcp").write_text("old")
    _step_dir(folder, ".step-6.tmp", marker=False, shard="new")
    manager = SimpleNamespace(folder=str(folder), rank=0, world_size=1, _inflight=(6, None),
                              _prune=lambda: None)
    CheckpointManager._finalize_inflight(manager)
    assert complete_steps(str(folder)) == ([6], [])
    assert sorted(os.listdir(folder / "step-6")) == [COMPLETE_MARKER, ".metadata", "__0_0.distcp"]
    assert (folder / "step-6" / "__0_0.distcp").read_text() == "new"


def test_no_resume_with_checkpointing_off(tmp_path):
    """checkpoint.enable = false never resumes, even from a folder holding checkpoints."""
    from titan_llava.config import load_config
    from titan_llava.resume_step import find_resume_step

    _step_dir(tmp_path / "checkpoint", "step-2", marker=True)
    on = load_config(["--job.dump_folder", str(tmp_path), "--checkpoint.enable", "true"])
    assert find_resume_step(on) == 2
    off = load_config(["--job.dump_folder", str(tmp_path), "--checkpoint.enable", "false"])
    assert find_resume_step(off) is None


def test_resume_refuses_another_part_training_with_the_same_group_count(tmp_path):
    """A projector-only checkpoint resumed with training.trainable = ["vision"]: both have two
    parameter groups, so only the per-group state check can tell that vision never trained."""
    dump = str(tmp_path)
    short = [*RUN, "--training.steps", "2", "--lr_scheduler.warmup_steps", "1"]
    ok(train(dump, *short, "--training.trainable", '["projector"]'))
    p = train(dump, *short, "--training.steps", "4", "--training.trainable", '["vision"]')
    ok(p, 2)
    assert "no optimizer state for the parameter groups vision, vision_no_decay" in p.stderr
