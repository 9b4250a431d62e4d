"""The mlp2x_gelu multimodal projector: Linear(vision_dim, llm_dim) -> exact GELU -> Linear(llm_dim, llm_dim)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Projector(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, llm_dim)
        self.linear_2 = nn.Linear(llm_dim, llm_dim)

    def init_weights(self) -> None:
        # The reference trains the projector from PyTorch's default nn.Linear init (stage 1).
        self.linear_1.reset_parameters()
        self.linear_2.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))  # exact (erf) GELU, not tanh
