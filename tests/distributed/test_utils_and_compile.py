"""Single-process pieces of titan_llava.distributed: world-of-one init, reduce helpers, parallel
dims, seeding, and per-block compile (+ AC) keeping names and matching eager."""

import copy
import os
import subprocess
import sys

import pytest
import torch

from titan_llava.config import load_config
from titan_llava.distributed.parallel_dims import ParallelDims
from titan_llava.distributed.parallelize import parallelize_llava
from titan_llava.distributed.utils import set_determinism
from titan_llava.models.args import LLAVA_FLAVORS
from titan_llava.models.llava import LlavaNext

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORLD_OF_ONE = """
import torch
from titan_llava.distributed.utils import (all_reduce_mean, all_reduce_scalars, all_reduce_sum,
                                           destroy_distributed, init_distributed)
rank, world, device = init_distributed()
assert (rank, world, device.type) == (0, 1, "cpu"), (rank, world, device)
assert all_reduce_sum(torch.tensor([2, 3])).tolist() == [2, 3]
assert all_reduce_mean(torch.tensor(4)).item() == 4.0
assert all_reduce_scalars({"a": 1, "b": 2.5}, device) == {"a": 1.0, "b": 2.5}
destroy_distributed()
print("ok")
"""


def test_world_of_one_without_torchrun():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = REPO
    proc = subprocess.run([sys.executable, "-c", _WORLD_OF_ONE], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_parallel_dims():
    par = load_config([]).parallelism
    d = ParallelDims.from_config(par, 8)
    assert (d.dp_replicate, d.dp_shard, d.dp_degree, d.hsdp) == (1, 8, 8, False)
    par = load_config(["--parallelism.data_parallel_replicate_degree", "2"]).parallelism
    d = ParallelDims.from_config(par, 8)
    assert (d.dp_replicate, d.dp_shard, d.hsdp) == (2, 4, True)
    with pytest.raises(ValueError, match="data_parallel_replicate_degree"):
        ParallelDims.from_config(
            load_config(["--parallelism.data_parallel_replicate_degree", "3"]).parallelism, 8)


def test_set_determinism():
    set_determinism(7)
    a = torch.randn(3)
    set_determinism(7)
    assert torch.equal(a, torch.randn(3))


@pytest.mark.slow
def test_compile_blocks_in_place_matches_eager():
    args = copy.deepcopy(LLAVA_FLAVORS["debug"])
    args.llm.n_layers = 4
    torch.manual_seed(0)
    eager = LlavaNext(args)
    model = copy.deepcopy(eager)
    names = [n for n, _ in model.named_parameters()]
    cfg = load_config(["--compile.enable", "--compile.components", "llm",
                       "--activation_checkpoint.mode", "full",
                       "--training.trainable", "projector,llm,vision"])
    parallelize_llava(model, None, cfg)
    assert [n for n, _ in model.named_parameters()] == names
    assert list(model.state_dict()) == list(eager.state_dict())
    from torch._dynamo.utils import counters

    counters.clear()
    for seq in (9, 14, 23):  # varying lengths: dynamic shapes, no per-step recompiles
        ids = torch.randint(1, 500, (2, seq))
        out, ref = model(ids), eager(ids)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        out.float().pow(2).mean().backward()
        ref.float().pow(2).mean().backward()
    # One graph shared by all blocks (a per-block graph would hit dynamo's recompile limit at 7B).
    assert counters["stats"]["unique_graphs"] == 1
    grads = dict(eager.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6)
