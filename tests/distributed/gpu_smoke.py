"""GPU smoke check of the trainer pieces (run by hand on one CUDA device, not collected by pytest):
world-of-one NCCL, parallelize_llava with bf16 FSDP2 + AC + compile, fused AdamW, the CE's memory
at the 7B vocab/dim (logits at every position vs at the loss positions only), and the MFU peak
lookup.  PYTHONPATH=. python tests/distributed/gpu_smoke.py
"""

import copy
import json
import time

import torch

from titan_llava.config import load_config
from titan_llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from titan_llava.data.anyres import num_image_tokens, num_tiles
from titan_llava.distributed.parallel_dims import ParallelDims
from titan_llava.distributed.parallelize import parallelize_llava
from titan_llava.distributed.utils import destroy_distributed, init_distributed
from titan_llava.flops import peak_flops, step_flops
from titan_llava.loss import cross_entropy_sum, cross_entropy_sum_at, loss_positions
from titan_llava.models.args import LLAVA_FLAVORS
from titan_llava.models.llava import LlavaNext
from titan_llava.optim import build_optimizer, set_trainable

rank, world, device = init_distributed()
report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "peak": peak_flops(device)}
args = copy.deepcopy(LLAVA_FLAVORS["debug"])
args.llm.dim, args.llm.n_heads, args.llm.hidden_dim, args.llm.n_layers = 512, 8, 1376, 4
args.vision.dim, args.vision.n_heads, args.vision.hidden_dim = 256, 4, 1024


def batch(extra_text):
    size = (640, 480)
    ids = [1] + list(range(3, 10)) + [IMAGE_TOKEN_INDEX] * num_image_tokens(size) + list(
        range(20, 20 + extra_text))
    ids = torch.tensor([ids, ids], device=device)
    labels = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
    px = torch.randn(2 * num_tiles(size), 3, 336, 336, device=device)
    return ids, labels, px, torch.tensor([size, size], device=device)


variants = {
    "plain": [],
    "ac_full_compile": ["--activation_checkpoint.mode", "full", "--compile.enable"],
    "ac_op_compile": ["--activation_checkpoint.mode", "selective", "--compile.enable"],
}
from torch._dynamo.utils import counters  # noqa: E402

for name, extra in variants.items():
    counters.clear()
    cfg = load_config(["--training.trainable", "projector,llm,vision", "--optimizer.lr", "1e-4",
                       "--training.mixed_precision_param", "bfloat16"] + extra)
    cfg.validate(world)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaNext(args)
    ref = copy.deepcopy(model)
    set_trainable(ref, cfg.training.trainable)
    parallelize_llava(model, ParallelDims.from_config(cfg.parallelism, world).build_mesh("cuda"), cfg)
    opt = build_optimizer(model, cfg)
    out = {"fused": opt.defaults.get("fused")}
    times = []
    for step, extra_text in enumerate((30, 50, 70, 90)):
        ids, labels, px, sizes = batch(extra_text)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(ids, px, sizes)
        s, n = cross_entropy_sum(logits, labels)
        (s / n).backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if step == 0:
            with torch.no_grad():
                r = ref(ids, px, sizes)
            out["bf16_vs_fp32_logits_maxdiff"] = (logits.float() - r).abs().max().item()
            out["ref_logits_absmax"] = r.abs().max().item()
            out["loss0"] = (s / n).item()
        out[f"loss{step}"] = (s / n).item()
    out["step_s"] = [round(t, 3) for t in times]
    out["grad_norm_last"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    fl = step_flops(args, [ids.shape[1]] * 2, px.shape[0], cfg.training.trainable)
    out["flops_last"] = fl.total
    out["unique_graphs"] = counters["stats"]["unique_graphs"]
    report[name] = out
    del model, ref, opt
    torch.cuda.empty_cache()

# CE at the 7B head, S=4096, D=4096, V=32000, bf16, half the targets valid: logits at every
# position vs only at the loss positions (what the trainer does).
g = torch.Generator(device=device).manual_seed(0)
h = (torch.randn(1, 4096, 4096, device=device, generator=g) * 0.5).bfloat16().requires_grad_()
w = (torch.randn(32000, 4096, device=device, generator=g) * 0.02).bfloat16().requires_grad_()
labels = torch.randint(0, 32000, (1, 4096), device=device, generator=g)
labels[:, :2048] = IGNORE_INDEX
res = {}
index, targets = loss_positions(labels)


def at_loss_positions():
    return cross_entropy_sum_at(h.flatten(0, 1)[index] @ w.t(), targets)


for label, fn in (("plain", lambda: cross_entropy_sum(h @ w.t(), labels)),
                  ("at_loss_positions", at_loss_positions)):
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    s, n = fn()
    s.backward()
    torch.cuda.synchronize()
    res[label] = {"loss": s.item() / n.item(), "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
                  "grad_h": h.grad.float().norm().item()}
report["ce_7b_head"] = res
print(json.dumps(report, indent=1))
destroy_distributed()
