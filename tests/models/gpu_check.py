"""GPU check for the model modules (run by hand on a lent device: `python -m tests.models.gpu_check`):
packed-document attention parity across backends on CUDA, and per-block timings of a 7B block.
"""

import time

import torch

from titan_llava.models.args import VICUNA_FLAVORS, VicunaArgs
from titan_llava.models.attention import build_attention_mask
from titan_llava.models.vicuna import Vicuna, VicunaBlock


def packed_parity() -> None:
    args = VicunaArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512, hidden_dim=512,
                      max_seq_len=1024)
    torch.manual_seed(0)
    lens = [100, 300, 57, 200]
    docs = [torch.randint(1, 512, (n,), device="cuda") for n in lens]
    tokens = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(n, device="cuda") for n in lens])[None]
    doc_ids = torch.cat([torch.full((n,), i, device="cuda") for i, n in enumerate(lens)])[None]
    ref = Vicuna(args, "sdpa").cuda().eval()
    ref.init_weights(std=0.1)
    alone = []
    with torch.no_grad():
        for d in docs:
            alone.append(ref(d[None])[0])
    alone = torch.cat(alone)
    for backend, compiled in [("sdpa", False), ("flex", False), ("flex", True)]:
        m = Vicuna(args, backend).cuda().eval()
        m.load_state_dict(ref.state_dict())
        if compiled:
            for k, blk in m.layers.items():
                m.layers[k] = torch.compile(blk)
        with torch.no_grad():
            out = m(tokens, positions=positions, document_ids=doc_ids)[0]
        print(f"packed parity fp32 {backend}{' compiled' if compiled else ''}: "
              f"max abs diff vs separate docs {(out - alone).abs().max().item():.3e}")


def time_block(backend: str, doc_lens: list[int] | None, compiled: bool) -> None:
    args = VICUNA_FLAVORS["vicuna-7b"]
    blk = VicunaBlock(args, backend).cuda().to(torch.bfloat16)
    s = 4096
    h = torch.randn(1, s, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    m = Vicuna(VicunaArgs(dim=args.dim, n_layers=1, n_heads=args.n_heads, vocab_size=8,
                          hidden_dim=8), backend)
    pos = torch.arange(s).expand(1, s)
    doc = None
    if doc_lens:
        doc = torch.cat([torch.full((n,), i) for i, n in enumerate(doc_lens)])[None].cuda()
        pos = torch.cat([torch.arange(n) for n in doc_lens])[None]
    cos, sin = m.rope_cos[pos].cuda(), m.rope_sin[pos].cuda()
    mask = build_attention_mask(backend, doc, 1, s, torch.device("cuda"))
    fn = torch.compile(blk) if compiled else blk
    for _ in range(3):
        fn(h, cos, sin, mask).sum().backward()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 10
    for _ in range(n):
        fn(h, cos, sin, mask).sum().backward()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / n
    # 6 * params * tokens for the matmuls + attention (causal ~ half of 4*S^2*D fwd, x3 fwd+bwd)
    n_params = sum(p.numel() for p in blk.parameters())
    flops = 6 * n_params * s + 3 * 2 * s * s * args.dim
    print(f"7B block bf16 S={s} {backend}{' compiled' if compiled else ''} docs={doc_lens}: "
          f"{dt * 1e3:.1f} ms fwd+bwd, ~{flops / dt / 1e12:.0f} TFLOP/s (causal attention FLOPs)")


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name())
    packed_parity()
    for backend, docs, compiled in [
        ("sdpa", None, False),
        ("sdpa", [1000, 2000, 1096], False),
        ("flex", [1000, 2000, 1096], True),
        ("sdpa", None, True),
    ]:
        time_block(backend, docs, compiled)
