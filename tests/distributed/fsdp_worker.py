"""torchrun worker for test_fsdp.py: FSDP2/HSDP debug LLaVA on CPU (gloo) vs one unsharded process.

Each rank takes its half of a fixed 4-row batch; the reference model runs the whole batch in every
rank. Results (max abs differences) are written by rank 0 to <out_dir>/results.json.
"""

import copy
import json
import sys

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from titan_llava.config import load_config
from titan_llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from titan_llava.data.anyres import num_image_tokens, num_tiles
from titan_llava.distributed.parallel_dims import ParallelDims
from titan_llava.distributed.parallelize import broadcast_replicated_params, parallelize_llava
from titan_llava.distributed.utils import destroy_distributed, init_distributed
from titan_llava.loss import cross_entropy_sum, global_valid_tokens, normalize_loss
from titan_llava.models.args import LLAVA_FLAVORS
from titan_llava.models.llava import LlavaNext
from titan_llava.optim import build_optimizer, set_trainable

VARIANTS = {
    "fsdp": [],
    "fsdp_ac_full": ["--activation_checkpoint.mode", "full"],
    "fsdp_ac_op": ["--activation_checkpoint.mode", "selective"],
    "fsdp_ac_every2": ["--activation_checkpoint.mode", "selective",
                       "--activation_checkpoint.selective_ac_option", "2"],
    "stage1": ["--training.trainable", "projector", "--activation_checkpoint.mode", "full"],
    # Stage 1 with the frozen Vicuna and CLIP whole on every rank (not sharded).
    "stage1_replicate_frozen": ["--training.trainable", "projector", "--activation_checkpoint.mode",
                                "full", "--parallelism.replicate_frozen", "true"],
    "hsdp": ["--parallelism.data_parallel_replicate_degree", "2",
             "--parallelism.data_parallel_shard_degree", "1"],
    # The vision tower as one FSDP unit (its blocks not units of their own), everything trains.
    "fsdp_vision_tower_unit": ["--parallelism.fsdp_vision_unit", "tower",
                               "--activation_checkpoint.mode", "full"],
    "hsdp_stage1_replicate_frozen": ["--parallelism.data_parallel_replicate_degree", "2",
                                     "--parallelism.data_parallel_shard_degree", "1",
                                     "--training.trainable", "projector",
                                     "--parallelism.replicate_frozen", "true"],
    # Per-block compile (fullgraph) under FSDP2, both towers, with and without trainable vision.
    "fsdp_compile_ac_full": ["--compile.enable", "--compile.components", "llm,vision",
                             "--activation_checkpoint.mode", "full"],
    "stage1_compile": ["--training.trainable", "projector", "--activation_checkpoint.mode", "full",
                       "--compile.enable", "--compile.components", "llm,vision"],
}
COMMON = ["--training.trainable", "projector,llm,vision", "--training.mixed_precision_param",
          "float32", "--optimizer.lr", "1e-3", "--optimizer.weight_decay", "0.1",
          "--optimizer.vision_lr", "1e-4", "--training.local_batch_size", "2"]


def make_rows(args):
    """4 rows: (image, text) for rank 0, (text, two images) for rank 1; right-padded with 0."""
    g = torch.Generator().manual_seed(123)
    specs = [[(336, 336)], [], [], [(700, 200), (200, 500)]]
    rows, tiles, sizes = [], [], []
    for images in specs:
        ids = [1] + torch.randint(3, 500, (6,), generator=g).tolist()
        for s in images:
            ids += [IMAGE_TOKEN_INDEX] * num_image_tokens(s, args.grid_pinpoints) + [9, 10]
            tiles.append(torch.randn(num_tiles(s, args.grid_pinpoints), 3, 336, 336, generator=g))
            sizes.append(s)
        rows.append((ids, len(images)))
    seq = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(4, seq, dtype=torch.long)
    labels = torch.full((4, seq), IGNORE_INDEX)
    for i, (ids, _) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        lab = torch.tensor(ids).masked_fill(torch.tensor(ids) == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
        labels[i, : len(ids)] = lab
        labels[i, 0] = IGNORE_INDEX
    return input_ids, labels, tiles, sizes, [n for _, n in rows]


def select(rows_slice, input_ids, labels, tiles, sizes, n_images):
    start = sum(n_images[: rows_slice.start])
    stop = start + sum(n_images[rows_slice])
    px = torch.cat(tiles[start:stop]) if stop > start else None
    sz = torch.tensor(sizes[start:stop]) if stop > start else None
    return input_ids[rows_slice], labels[rows_slice], px, sz


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run_variant(name, extra, rank, world, batch):
    cfg = load_config(COMMON + extra)
    cfg.validate(world_size=world)
    args = copy.deepcopy(LLAVA_FLAVORS["debug"])
    torch.manual_seed(0)
    model = LlavaNext(args)
    ref = copy.deepcopy(model)
    set_trainable(ref, cfg.training.trainable)
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict().keys())
    dims = ParallelDims.from_config(cfg.parallelism, world)
    parallelize_llava(model, dims.build_mesh("cpu"), cfg)
    out = {
        "names_unchanged": [n for n, _ in model.named_parameters()] == names,
        "keys_unchanged": list(model.state_dict().keys()) == keys,
        "vision_block_units": sum(
            isinstance(b, FSDPModule) for b in model.vision_tower.layers.values()
        ),
        # Sharded (DTensor) exactly where the parameter trains, or everywhere without replication.
        "sharding_ok": all(
            isinstance(p, DTensor) == (p.requires_grad or not cfg.parallelism.replicate_frozen)
            for p in model.parameters()
        ),
    }
    # Count how often each LLM block's first norm runs: twice per step when the block is
    # checkpointed (forward + recompute in backward), once otherwise.
    # (Not with compile: a hook inside a fullgraph-compiled block would be a graph break.)
    norm_calls = {i: 0 for i in model.language_model.layers}
    for i, block in model.language_model.layers.items():
        if cfg.compile.enable:
            break
        block.attention_norm.register_forward_pre_hook(
            lambda *_, i=i: norm_calls.__setitem__(i, norm_calls[i] + 1)
        )
    # Sharded: this rank's two rows, global-token normalisation.
    ids, lab, px, sz = select(slice(2 * rank, 2 * rank + 2), *batch)
    logits = model(ids, px, sz)
    s, n = cross_entropy_sum(logits, lab)
    total = global_valid_tokens([lab])
    normalize_loss(s, n, "global_tokens", global_tokens=total, dp_degree=dims.dp_degree).backward()
    out["norm_calls"] = [norm_calls[i] for i in sorted(norm_calls)]
    # Reference: the whole batch in one process.
    ids_all, lab_all, px_all, sz_all = select(slice(0, 4), *batch)
    ref_logits = ref(ids_all, px_all, sz_all)
    s_ref, n_ref = cross_entropy_sum(ref_logits, lab_all)
    (s_ref / n_ref).backward()
    out["total_tokens_match"] = int(total) == int(n_ref)
    out["logits_diff"] = (logits - ref_logits[2 * rank: 2 * rank + 2]).abs().max().item()
    grad_diff, grad_presence_ok = 0.0, True
    ours = dict(model.named_parameters())
    for pname, p_ref in ref.named_parameters():
        g = ours[pname].grad
        if (g is None) != (p_ref.grad is None) or (p_ref.grad is None) == p_ref.requires_grad:
            grad_presence_ok = False
            continue
        if g is not None:
            grad_diff = max(grad_diff, (full(g) - p_ref.grad).abs().max().item())
    out["grad_diff"] = grad_diff
    out["grad_presence_ok"] = grad_presence_ok
    out["frozen_ok"] = all(
        p.requires_grad
        == (pname.startswith(("projector.", "image_newline")) or "llm" in cfg.training.trainable)
        for pname, p in model.named_parameters()
    )
    # Clip + one AdamW step on both; compare the updated parameters.
    opt, ref_opt = build_optimizer(model, cfg), build_optimizer(ref, cfg)
    trainable_ours = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(trainable_ours, 1e-3)
    ref_norm = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad], 1e-3)
    out["grad_norm_diff"] = abs(full(norm).item() - ref_norm.item())
    opt.step()
    ref_opt.step()
    out["param_diff_after_step"] = max(
        (full(ours[pname].detach()) - p_ref.detach()).abs().max().item()
        for pname, p_ref in ref.named_parameters()
    )
    out["state_params"] = len(opt.state)
    out["ref_state_params"] = len(ref_opt.state)
    return out


def main(out_dir):
    rank, world, _ = init_distributed()
    torch.set_num_threads(1)
    batch = make_rows(LLAVA_FLAVORS["debug"])
    results = {name: run_variant(name, extra, rank, world, batch) for name, extra in VARIANTS.items()}
    # Meta-device build path: meta -> parallelize -> to_empty -> init_weights.
    with torch.device("meta"):
        meta_model = LlavaNext(copy.deepcopy(LLAVA_FLAVORS["debug"]))
    names = [n for n, _ in meta_model.named_parameters()]
    parallelize_llava(meta_model, ParallelDims.from_config(
        load_config([]).parallelism, world).build_mesh("cpu"), load_config(COMMON))
    meta_model.to_empty(device="cpu")
    meta_model.init_weights()
    results["meta_init"] = {
        "names_unchanged": [n for n, _ in meta_model.named_parameters()] == names,
        "finite": all(bool(torch.isfinite(full(p)).all()) for p in meta_model.parameters()),
        "rope_finite": bool(torch.isfinite(meta_model.language_model.rope_cos).all()),
    }
    # replicate_frozen after a random init: ranks that drew different values end up with rank 0's.
    model = LlavaNext(copy.deepcopy(LLAVA_FLAVORS["debug"]))
    cfg = load_config(COMMON + VARIANTS["stage1_replicate_frozen"])
    parallelize_llava(model, ParallelDims.from_config(cfg.parallelism, world).build_mesh("cpu"), cfg)
    whole = [p for p in model.parameters() if not isinstance(p, DTensor)]
    with torch.no_grad():
        for p in whole:
            p.add_(float(rank))
    sums = [None] * world
    n = broadcast_replicated_params(model)
    torch.distributed.all_gather_object(sums, [float(p.double().sum()) for p in whole])
    results["broadcast"] = {"count": n, "whole": len(whole), "agree": all(x == sums[0] for x in sums)}
    if rank == 0:
        with open(f"{out_dir}/results.json", "w") as f:
            json.dump(results, f, indent=1)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
