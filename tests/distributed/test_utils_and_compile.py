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
    proc = subprocess.run([sys.executable, "-c", _WORLD_OF_ONE], check=False, env=env,
                          capture_output=True, text=True, timeout=120)
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


@pytest.mark.slow
def test_compiled_vision_and_llm_blocks_trace_whole_and_match_eager():
    """Per-block compile + full AC on both towers: every block traces as ONE graph (fullgraph; a
    break inside the checkpointed forward once left whole blocks eager without a word), vision
    and LLM blocks keep separate compile caches, and the result matches eager for images of
    several tile counts, logits at some positions only (trimmed last block), and a text-only
    (stand-in tile) batch."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    from titan_llava.constants import IMAGE_TOKEN_INDEX
    from titan_llava.data.anyres import num_image_tokens, num_tiles

    args = copy.deepcopy(LLAVA_FLAVORS["debug"])
    torch.manual_seed(0)
    eager = LlavaNext(args)
    model = copy.deepcopy(eager)
    cfg = load_config(["--compile.enable", "--compile.components", "llm,vision",
                       "--activation_checkpoint.mode", "full",
                       "--training.trainable", "projector,llm,vision"])
    parallelize_llava(model, None, cfg)
    pin, tile = args.grid_pinpoints, args.vision.image_size
    counters.clear()
    for (w, h), text in [((336, 336), 5), ((640, 480), 9), ((500, 375), 3), ((1000, 300), 7)]:
        n_img, tiles = num_image_tokens((w, h), pin), num_tiles((w, h), pin)
        ids = torch.tensor([[1] * text + [IMAGE_TOKEN_INDEX] * n_img + [2]])
        pixels = torch.randn(tiles, 3, tile, tile)
        sizes = torch.tensor([[w, h]])
        out, ref = model(ids, pixels, sizes), eager(ids, pixels, sizes)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        out.float().pow(2).mean().backward()
        ref.float().pow(2).mean().backward()
    # Logits at some positions only (the trainer's path: the last block is trimmed after attention):
    # one more graph for the LLM block class (output_index given), whatever the number of positions.
    llm_code = type(model.language_model.layers["0"]).forward.__code__
    before = len(_debug_get_cache_entry_list(llm_code))
    for index in (torch.tensor([0, 4, ids.numel() - 1]), torch.tensor([1, 2, 3, 5, 8])):
        out = model(ids, pixels, sizes, output_index=index)
        ref = eager(ids, pixels, sizes, output_index=index)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        out.float().pow(2).mean().backward()
        ref.float().pow(2).mean().backward()
    assert len(_debug_get_cache_entry_list(llm_code)) == before + 1
    ids = torch.randint(1, 500, (2, 11))
    stand_in = torch.zeros(1, 3, tile, tile)
    out = model(ids, stand_in, vision_keepalive=True)
    ref = eager(ids, stand_in, vision_keepalive=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    vision_cls = type(model.vision_tower.layers["0"])
    llm_cls = type(model.language_model.layers["0"])
    assert vision_cls.forward.__code__ is not llm_cls.forward.__code__
    for cls in (vision_cls, llm_cls):
        entries = _debug_get_cache_entry_list(cls.forward.__code__)
        # Compiled (at least one entry), and few recompiles for 5 shapes (dynamic shapes); the LLM
        # blocks have one more graph, for the trimmed last block.
        assert 1 <= len(entries) <= (3 if cls is vision_cls else 4), (cls.__name__, len(entries))
    grads = dict(eager.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.slow
def test_stage1_compile_with_full_ac_leaves_the_frozen_tower_unchecked():
    """Stage 1 (projector trains): the frozen vision tower runs without autograd, so it gets no
    checkpointing (inductor refuses checkpoint regions in an inference graph); the frozen LLM
    keeps it (the projector's gradient flows back through it). Compiled == eager."""
    from titan_llava.constants import IMAGE_TOKEN_INDEX
    from titan_llava.data.anyres import num_image_tokens, num_tiles
    from titan_llava.distributed.parallelize import _CheckpointedBlock

    args = copy.deepcopy(LLAVA_FLAVORS["debug"])
    torch.manual_seed(0)
    eager = LlavaNext(args)
    model = copy.deepcopy(eager)
    cfg = load_config(["--compile.enable", "--compile.components", "llm,vision",
                       "--activation_checkpoint.mode", "full", "--training.trainable", "projector"])
    parallelize_llava(model, None, cfg)
    eager.requires_grad_(False)
    eager.projector.requires_grad_(True)
    assert not any(isinstance(b, _CheckpointedBlock) for b in model.vision_tower.layers.values())
    assert all(isinstance(b, _CheckpointedBlock) for b in model.language_model.layers.values())
    w, h = 640, 480
    n_img = num_image_tokens((w, h), args.grid_pinpoints)
    ids = torch.tensor([[1, 7] + [IMAGE_TOKEN_INDEX] * n_img + [2]])
    pixels = torch.randn(num_tiles((w, h), args.grid_pinpoints), 3, 336, 336)
    out = model(ids, pixels, torch.tensor([[w, h]]))
    ref = eager(ids, pixels, torch.tensor([[w, h]]))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.float().pow(2).mean().backward()
    ref.float().pow(2).mean().backward()
    for (n, p), (_, q) in zip(model.projector.named_parameters(), eager.projector.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("components", [["llm"], ["vision"], ["llm", "vision"], []])
def test_activation_checkpointing_applies_to_the_named_towers_only(components):
    """Stage 2 (everything trains): activation_checkpoint.components picks the towers whose
    blocks the mode wraps; the others run without AC. Values are unchanged either way."""
    from titan_llava.distributed.parallelize import _CheckpointedBlock

    args = copy.deepcopy(LLAVA_FLAVORS["debug"])
    torch.manual_seed(0)
    model = LlavaNext(args)
    cfg = load_config(["--activation_checkpoint.mode", "full",
                       "--activation_checkpoint.components", ",".join(components) or "[]",
                       "--training.trainable", "projector,llm,vision"])  # fmt: skip
    assert cfg.activation_checkpoint.components == components
    parallelize_llava(model, None, cfg)
    for name, tower in (("llm", model.language_model), ("vision", model.vision_tower)):
        wrapped = [isinstance(b, _CheckpointedBlock) for b in tower.layers.values()]
        assert wrapped == [name in components] * len(wrapped), (name, wrapped)


@pytest.mark.parametrize("llm_without, vision_without", [(1, 0), (0, 2), (2, 1)])
def test_layers_without_ac_leave_the_last_blocks_of_each_tower_unchecked(
    llm_without, vision_without
):
    """activation_checkpoint.{llm,vision}_layers_without_ac: the last N blocks of that tower run
    without AC, the blocks before them keep the mode; the config key reaches parallelize_llava."""
    from titan_llava.distributed.parallelize import _CheckpointedBlock

    args = copy.deepcopy(LLAVA_FLAVORS["debug"])
    model = LlavaNext(args)
    cfg = load_config(["--activation_checkpoint.mode", "selective",
                       "--activation_checkpoint.llm_layers_without_ac", str(llm_without),
                       "--activation_checkpoint.vision_layers_without_ac", str(vision_without),
                       "--training.trainable", "projector,llm,vision"])  # fmt: skip
    parallelize_llava(model, None, cfg)
    for tower, without in ((model.language_model, llm_without), (model.vision_tower, vision_without)):
        wrapped = [isinstance(b, _CheckpointedBlock) for b in tower.layers.values()]
        assert wrapped == [True] * (len(wrapped) - without) + [False] * without, wrapped


class _MatmulCount(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.n += 1
        return func(*args, **(kwargs or {}))


class _MLPBlock(torch.nn.Module):
    """Four matmuls with cheap ops between them, like an LLM block's."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        h = torch.nn.functional.silu(self.a(torch.nn.functional.rms_norm(x, (8,))))
        # The last matmul's output feeds an activation, so its backward needs it: a recompute
        # cannot stop early before it.
        return x + torch.nn.functional.silu(self.d(self.c(h) * torch.sigmoid(self.b(h))))


def _assert_recomputes(ref: torch.nn.Module, model: torch.nn.Module, recomputed: int) -> None:
    """`model` (a checkpointed copy of `ref`) runs `recomputed` more matmuls than `ref` in forward
    + backward, and its gradients are bit-identical."""
    x = torch.randn(5, 8)
    counts = []
    for m in (ref, model):
        with _MatmulCount() as counter:
            m(x).square().sum().backward()
        counts.append(counter.n)
    assert counts[1] - counts[0] == recomputed, counts
    for p_ref, p in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=0)


@pytest.mark.parametrize("mode, option, recomputed", [
    ("none", "op", 0), ("full", "op", 4), ("selective", "op", 2), ("selective", "op_all_mm", 0),
])
def test_ac_policies_recompute_the_matmuls_they_say(mode, option, recomputed):
    """Matmuls run in forward + backward against no AC: full recomputes all 4 of the block's,
    "op" every second one (2), "op_all_mm" none. The gradients do not change."""
    from titan_llava.distributed.parallelize import apply_activation_checkpointing

    load_config(["--activation_checkpoint.mode", mode,
                 "--activation_checkpoint.selective_ac_option", option])  # valid keys
    torch.manual_seed(0)
    ref, block = _MLPBlock(), _MLPBlock()
    block.load_state_dict(ref.state_dict())
    apply_activation_checkpointing(torch.nn.ModuleDict({"0": block}), mode, option)
    _assert_recomputes(ref, block, recomputed)


@pytest.mark.parametrize("mode, option, per_block", [("full", "op", 4), ("selective", "op", 2), ("selective", "2", 4)])
@pytest.mark.parametrize("without_ac", [0, 1, 3])
def test_blocks_without_ac_recompute_nothing(mode, option, per_block, without_ac):
    """Three blocks, the last `without_ac` of them without AC: only the others recompute (every
    N-th block counts from the first: with "2", blocks 0 and 2). Gradients do not change."""
    from titan_llava.distributed.parallelize import apply_activation_checkpointing

    torch.manual_seed(0)
    ref = torch.nn.Sequential(*(_MLPBlock() for _ in range(3)))
    model = copy.deepcopy(ref)
    apply_activation_checkpointing(
        torch.nn.ModuleDict({str(i): b for i, b in enumerate(model)}), mode, option, without_ac
    )
    checkpointed = [i for i in range(3 - without_ac) if option != "2" or i % 2 == 0]
    _assert_recomputes(ref, model, per_block * len(checkpointed))


def test_blocks_without_ac_cannot_exceed_the_blocks():
    from titan_llava.distributed.parallelize import apply_activation_checkpointing

    blocks = torch.nn.ModuleDict({"0": _MLPBlock(), "1": _MLPBlock()})
    with pytest.raises(ValueError, match=r"without_ac must be in \[0, 2\].*got 3"):
        apply_activation_checkpointing(blocks, "full", "op", 3)


def test_set_matmul_precision_is_tf32_for_mixed_precision_on_cuda_only():
    """The recipe's tf32 for CUDA runs in bf16; a float32 run and a CPU run keep exact fp32."""
    from titan_llava.distributed.utils import set_matmul_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not set_matmul_precision(torch.device("cpu"), "bfloat16")
        assert not set_matmul_precision(torch.device("cuda"), "float32")
        assert torch.get_float32_matmul_precision() == "highest"
        assert set_matmul_precision(torch.device("cuda"), "bfloat16")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
