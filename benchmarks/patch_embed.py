"""CLIP's patch embedding at LLaVA-NeXT shapes: the Conv2d the model uses (kernel = stride = 14,
3 input channels) against the same product written as patch extraction + one matmul, forward
and forward + weight-gradient backward. Prints ms per call and the max difference between the two.

    python benchmarks/patch_embed.py [--tiles 33] [--iters 20]

Stage 1's frozen tower takes ~67 ms per step on an H100 for ~33 tiles, about twice what its FLOPs
predict (benchmarks/README.md, round 4); this checks whether cuDNN's kernel for this unusual
convolution is part of it. On CPU (no CUDA) it runs a few tiles, as a smoke test.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from timing import timed_ms


def patches_matmul(pixels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Conv2d(pixels, weight, stride = kernel) as [T, P, C*k*k] @ [C*k*k, D] -> [T, D, h, w]."""
    t, c, hgt, wid = pixels.shape
    d, _, k, _ = weight.shape
    h, w = hgt // k, wid // k
    patches = pixels.view(t, c, h, k, w, k).permute(0, 2, 4, 1, 3, 5).reshape(t, h * w, c * k * k)
    out = patches @ weight.view(d, c * k * k).t()
    return out.view(t, h, w, d).permute(0, 3, 1, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiles", type=int, default=None, help="default: 33 on CUDA, 2 on CPU")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--size", type=int, default=336)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--dim", type=int, default=1024)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tiles = a.tiles or (33 if cuda else 2)
    g = torch.Generator(device=device).manual_seed(0)
    pixels = torch.randn(tiles, 3, a.size, a.size, device=device, dtype=dtype, generator=g)
    weight = torch.randn(a.dim, 3, a.patch, a.patch, device=device, dtype=dtype, generator=g) * 0.02
    weight.requires_grad_(True)
    ref = F.conv2d(pixels, weight, stride=a.patch)
    alt = patches_matmul(pixels, weight)
    diff = (ref.float() - alt.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    print(f"patch embedding: {tiles} tiles of {a.size}x{a.size}, patch {a.patch}, dim {a.dim}, "
          f"{dtype} on {torch.cuda.get_device_name() if cuda else 'cpu'} (torch {torch.__version__})")
    print(f"max |conv - patches@W| = {diff:.3e} (output max {scale:.3e})")

    def fwd(fn):
        return lambda: fn(pixels, weight)

    def fwd_bwd(fn):
        def run():
            weight.grad = None
            fn(pixels, weight).float().pow(2).mean().backward()
        return run

    conv = lambda x, w: F.conv2d(x, w, stride=a.patch)  # noqa: E731
    rows = []
    for label, fn in (("conv2d", conv), ("patches @ W", patches_matmul)):
        with torch.no_grad():
            f_ms = timed_ms(fwd(fn), a.iters, cuda)
        rows.append((label, f_ms, timed_ms(fwd_bwd(fn), a.iters, cuda)))
    if cuda:
        torch.backends.cudnn.benchmark = True
        with torch.no_grad():
            f_ms = timed_ms(fwd(conv), a.iters, cuda)
        rows.append(("conv2d, cudnn.benchmark", f_ms, timed_ms(fwd_bwd(conv), a.iters, cuda)))
    flop = 2 * tiles * (a.size // a.patch) ** 2 * 3 * a.patch**2 * a.dim
    print(f"{'':26s} {'forward ms':>11s} {'fwd+bwd(w) ms':>14s}   ({flop / 1e9:.1f} GFLOP forward)")
    for label, f_ms, fb_ms in rows:
        print(f"{label:26s} {f_ms:11.3f} {fb_ms:14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
