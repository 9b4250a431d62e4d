"""Checkpoints with 2 gloo processes: packed resume after a kill mid-accumulation is bit-identical,
a 2-rank checkpoint loads into 1 rank (model + optimizer equal; the data state refuses clearly), and
a NaN on one rank stops every rank before the optimizer step."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed.checkpoint as dcp

from tests.test_checkpoint import (
    CONFIG,
    ROOT,
    assert_same_history,
    ckpt,
    metrics,
    ok,
    train,
)
from titan_llava.checkpoint_io import complete_steps, read_metadata

RUN2 = [
    "--training.steps", "8", "--training.local_batch_size", "1",
    "--training.global_batch_size", "4", "--training.mixed_precision_param", "float32",
    "--checkpoint.enable", "true", "--checkpoint.interval", "4", "--checkpoint.keep_latest_k", "0",
    "--data.packing", "true", "--data.max_seq_len", "2048", "--lr_scheduler.warmup_steps", "2",
]  # fmt: skip


def test_two_ranks_packed_kill_resume_and_reshard(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    ok(train(straight, *RUN2, nproc=2))
    ok(train(resumed, *RUN2, nproc=2, fault="accum@6"), 1)  # torchrun reports the killed workers
    assert complete_steps(ckpt(resumed)) == ([4], [])
    ok(train(resumed, *RUN2, nproc=2))
    assert_same_history(metrics(resumed), metrics(straight), 8)

    # The data state of 2 ranks cannot move to 1: a set-up error saying what to do.
    p = train(resumed, *RUN2, nproc=1)
    ok(p, 2)
    assert "saved with 2 data-parallel ranks" in p.stderr
    assert "--checkpoint.initial_load_model_only true" in p.stderr

    # Model and optimizer reshard 2 -> 1 exactly (compared with a plain single-process read).
    step_dir = os.path.join(ckpt(straight), "step-8")
    loaded = _load_one_rank(tmp_path, step_dir)
    meta = read_metadata(step_dir, "test").state_dict_metadata
    keys = [k for k in meta if k.startswith(("model.", "optimizer.state."))]
    assert set(loaded) == set(keys)
    assert any(".exp_avg_sq" in k for k in keys)
    for k in keys:
        ref = torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype)
        dcp.load({k: ref}, checkpoint_id=step_dir, no_dist=True)
        assert torch.equal(loaded[k], ref), k


def _load_one_rank(tmp_path, step_dir: str) -> dict[str, torch.Tensor]:
    """A 1-process trainer loads the 2-rank checkpoint (all but the data state); its model and
    optimizer state are written out with torch.save."""
    out = str(tmp_path / "one_rank.pt")
    args = ["--job.config_file", CONFIG, "--job.dump_folder", str(tmp_path / "one"), *RUN2,
            "--checkpoint.enable", "false"]  # fmt: skip
    code = (
        "import torch; from titan_llava.config import load_config; "
        "from titan_llava.train import Trainer; "
        "from torch.distributed.checkpoint.state_dict import get_model_state_dict, "
        "get_optimizer_state_dict; "
        f"t = Trainer(load_config({args!r})); "
        f"t.checkpointer.load({step_dir!r}, 'test', data=False); "
        "full = lambda v: (v.full_tensor() if hasattr(v, 'full_tensor') else v).detach().clone(); "
        "sd = {'model.' + k: full(v) for k, v in get_model_state_dict(t.model).items()}; "
        "osd = get_optimizer_state_dict(t.model, t.optimizer)['state']; "
        "sd.update({f'optimizer.state.{k}.{n}': full(v) for k, s in osd.items() "
        "for n, v in s.items()}); "
        f"torch.save(sd, {out!r}); t.close()"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=180, check=False)  # fmt: skip
    ok(p)
    return torch.load(out, weights_only=True)


def test_nan_on_one_rank_stops_all_ranks_before_the_step(tmp_path):
    dump = str(tmp_path)
    p = train(dump, *RUN2, "--checkpoint.interval", "2", nproc=2, fault="nan_loss@3@1")
    assert p.returncode != 0
    out = p.stdout + p.stderr
    # Both ranks raise (the reduced loss is NaN everywhere), naming the step.
    assert out.count("step 3: non-finite loss") >= 2, out[-4000:]
    assert sorted(metrics(dump)) == [1, 2]
    assert complete_steps(ckpt(dump)) == ([2], [])
