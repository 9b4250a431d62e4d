"""GPU check of sdpa's packed-row route to torch's varlen kernel: a bf16 Vicuna on packed rows gives
the same logits and input gradients as the dense-mask SDPA path (and as each document run alone),
eager and with per-block compile, and times one attention call both ways. Run on CUDA: python benchmarks/varlen_parity.py
"""

from __future__ import annotations

import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from titan_llava.distributed.parallelize import compile_block
from titan_llava.models import attention
from titan_llava.models.args import VicunaArgs
from titan_llava.models.attention import (
    VarlenInfo,
    build_attention_mask,
    causal_attention,
)
from titan_llava.models.vicuna import Vicuna


def _run(model: Vicuna, h_BSD: torch.Tensor, positions, doc_ids, dense: bool):
    h = h_BSD.detach().requires_grad_(True)
    real = attention.torch_varlen_usable
    if dense:  # force the dense-mask SDPA path, as on CPU
        attention.torch_varlen_usable = lambda *a, **k: False
    try:
        logits = model(h_BSD=h, positions=positions, document_ids=doc_ids)
    finally:
        attention.torch_varlen_usable = real
    logits.float().square().mean().backward()
    return logits.float(), h.grad.float()


def _time(fn, n: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / n


def main() -> int:
    assert torch.cuda.is_available(), "needs CUDA"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    args = VicunaArgs(dim=512, n_layers=2, n_heads=4, vocab_size=256, hidden_dim=1024, max_seq_len=4096)
    model = Vicuna(args).to(dev)
    model.init_weights(std=0.02)
    model = model.to(torch.bfloat16)
    lens = [[700, 1300, 48], [2048]]  # row 1: one document; row 0: three (the last one padding-like)
    seq = 2048
    doc_ids = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(r)]) for r in lens]).to(dev)
    positions = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in lens]).to(dev)
    h_BSD = torch.randn(2, seq, args.dim, device=dev, dtype=torch.bfloat16)
    ok = True
    mask = build_attention_mask("sdpa", doc_ids, 2, seq, dev, dtype=torch.bfloat16)
    print(f"torch {torch.__version__}; route taken: {isinstance(mask, VarlenInfo)}")
    ok &= isinstance(mask, VarlenInfo)
    lv, gv = _run(model, h_BSD, positions, doc_ids, dense=False)
    ld, gd = _run(model, h_BSD, positions, doc_ids, dense=True)
    dl = (lv - ld).abs().max().item() / ld.abs().max().item()
    dg = (gv - gd).abs().max().item() / gd.abs().max().item()
    print(f"varlen vs dense mask (bf16): logits rel max diff {dl:.2e}, input-grad rel max diff {dg:.2e}")
    ok &= dl < 2e-2 and dg < 5e-2
    # Each document of row 0 alone (plain causal SDPA) must give the packed logits.
    start = 0
    for n in lens[0]:
        alone = model(h_BSD=h_BSD[:1, start : start + n]).float()[0]
        d = (lv[0, start : start + n] - alone).abs().max().item() / alone.abs().max().item()
        print(f"doc at {start} (len {n}) vs alone: rel max diff {d:.2e}")
        ok &= d < 2e-2
        start += n
    # Per-block compile (the trainer's compile_block, dynamic shapes) on the varlen route: same
    # logits and gradients as eager, then a second packing (one 6144-token row of 5 documents)
    # through the same graphs.
    compiled = copy.deepcopy(model)
    for block in compiled.layers.values():
        compile_block(block)
    lc, gc = _run(compiled, h_BSD, positions, doc_ids, dense=False)
    dl = (lc - lv).abs().max().item() / lv.abs().max().item()
    dg = (gc - gv).abs().max().item() / gv.abs().max().item()
    print(f"compiled vs eager (varlen): logits rel max diff {dl:.2e}, input-grad rel max diff {dg:.2e}")
    ok &= dl < 2e-2 and dg < 5e-2
    lens2 = [1500, 2200, 900, 1400, 144]
    ids2 = torch.cat([torch.full((n,), i) for i, n in enumerate(lens2)])[None].to(dev)
    pos2 = torch.cat([torch.arange(n) for n in lens2])[None].to(dev)
    h2 = torch.randn(1, sum(lens2), args.dim, device=dev, dtype=torch.bfloat16)
    l2c, _ = _run(compiled, h2, pos2, ids2, dense=False)
    l2e, _ = _run(model, h2, pos2, ids2, dense=False)
    d = (l2c - l2e).abs().max().item() / l2e.abs().max().item()
    print(f"compiled, second shape (1 x {sum(lens2)}, 5 documents) vs eager: rel max diff {d:.2e}")
    ok &= d < 2e-2
    # Timing of one attention call at the 7B head shape, 4 rows of 4096 with ~2 documents each.
    q = torch.randn(4, 4096, 32, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.cat([torch.zeros(4, 2200), torch.ones(4, 1400), torch.full((4, 496), 2)], 1).to(dev)
    for name, dtype in (("varlen", torch.bfloat16), ("dense mask", None)):
        m = build_attention_mask("sdpa", ids, 4, 4096, dev, dtype=dtype)

        def fwd_bwd(m=m):
            causal_attention(q, q, q, m, "sdpa").sum().backward()

        print(f"attention fwd+bwd 4x4096x32x128 {name}: {_time(fwd_bwd):.2f} ms")
    print("VARLEN PARITY " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
