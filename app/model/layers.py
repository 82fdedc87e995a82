"""Dense layers shared by the attention blocks and the experts."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_XD: torch.Tensor) -> torch.Tensor:
        return x_XD * torch.rsqrt(x_XD.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class GatedMLP(nn.Module):
    """SiLU(x·W_g) ⊙ (x·W_u) → W_d: the gated update used for messages and node updates."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.gate_up = nn.Linear(in_dim, 2 * hidden)  # one matmul for both halves
        self.down = nn.Linear(hidden, out_dim)

    def forward(self, x_XF: torch.Tensor) -> torch.Tensor:
        gate_XH, up_XH = self.gate_up(x_XF).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate_XH) * up_XH)
