"""CLIP ViT vision tower (the vision half of CLIP) as LLaVA uses it: runs only the encoder layers up
to `select_layer` and returns that layer's patch features without the CLS token, [T, P, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titan_llava.models.args import CLIPVisionArgs


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x_TPD: Tensor) -> Tensor:
        t, p, d = x_TPD.shape
        q, k, v = (
            proj(x_TPD).view(t, p, self.n_heads, d // self.n_heads).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out_THPd = F.scaled_dot_product_attention(q, k, v)  # bidirectional, 1/sqrt(head_dim)
        return self.out_proj(out_THPd.transpose(1, 2).reshape(t, p, d))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = quick_gelu if act == "quick_gelu" else F.gelu

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPBlock(nn.Module):
    def __init__(self, args: CLIPVisionArgs) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attn = CLIPAttention(args.dim, args.n_heads)
        self.norm2 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.mlp = CLIPMLP(args.dim, args.hidden_dim, args.hidden_act)

    def forward(self, x_TPD: Tensor) -> Tensor:
        x_TPD = x_TPD + self.attn(self.norm1(x_TPD))
        return x_TPD + self.mlp(self.norm2(x_TPD))

    def init_weights(self, std: float) -> None:
        for norm in (self.norm1, self.norm2):
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)
        for lin in (*self.attn.children(), *self.mlp.children()):
            if isinstance(lin, nn.Linear):
                nn.init.normal_(lin.weight, mean=0.0, std=std)
                nn.init.zeros_(lin.bias)


class CLIPVisionTower(nn.Module):
    def __init__(self, args: CLIPVisionArgs) -> None:
        super().__init__()
        self.args = args
        self.patch_embed = nn.Conv2d(
            3, args.dim, kernel_size=args.patch_size, stride=args.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(torch.empty(args.dim))
        self.position_embedding = nn.Embedding(args.num_patches + 1, args.dim)
        self.pre_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        # Layers past the selected one never influence LLaVA's features, so they are not built.
        self.layers = nn.ModuleDict({str(i): CLIPBlock(args) for i in range(args.n_built_layers)})
        nn.init.normal_(self.class_embedding, std=args.dim**-0.5)

    def init_weights(self, std: float = 0.02) -> None:
        """CLIP-style init: class token N(0, 1/sqrt(D)), matrices N(0, std), norms 1/0, biases 0."""
        nn.init.normal_(self.class_embedding, mean=0.0, std=self.args.dim**-0.5)
        nn.init.normal_(self.patch_embed.weight, mean=0.0, std=std)
        nn.init.normal_(self.position_embedding.weight, mean=0.0, std=std)
        nn.init.ones_(self.pre_norm.weight)
        nn.init.zeros_(self.pre_norm.bias)
        for layer in self.layers.values():
            layer.init_weights(std)

    def forward(self, pixels_TCHW: Tensor) -> Tensor:
        """Selected-layer patch features [T, num_patches, D] (CLS dropped) for T tiles."""
        size = self.args.image_size
        if pixels_TCHW.dim() != 4 or pixels_TCHW.shape[1:] != (3, size, size):
            raise ValueError(
                f"pixel_values must be [T, 3, {size}, {size}], got {tuple(pixels_TCHW.shape)}"
            )
        weight = self.patch_embed.weight
        patches_TDhw = self.patch_embed(pixels_TCHW.to(weight.dtype))
        x_TPD = patches_TDhw.flatten(2).transpose(1, 2)
        cls_T1D = self.class_embedding.to(x_TPD.dtype).expand(x_TPD.shape[0], 1, -1)
        x_TPD = torch.cat([cls_T1D, x_TPD], dim=1) + self.position_embedding.weight.to(x_TPD.dtype)
        x_TPD = self.pre_norm(x_TPD)
        for layer in self.layers.values():
            x_TPD = layer(x_TPD)
        return x_TPD[:, 1:]
