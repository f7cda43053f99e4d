"""A two-layer toy model with the module and a synthetic regression task, shared by the CPU and
CUDA training checks."""

from __future__ import annotations

import math

import torch
from torch import nn

from omnimoe.torch import OmniMoE, OmniMoEConfig

IN_FEATURES = 8


class ToyModel(nn.Module):
    """in -> [x + OmniMoE(LayerNorm(x))] x 2 -> out."""

    def __init__(self, hidden=32, num_experts=64, top_k=8, intermediate=32):
        super().__init__()
        cfg = OmniMoEConfig(hidden_size=hidden, intermediate_size=intermediate,
                            hidden_act="silu", num_experts=num_experts,
                            num_experts_per_token=top_k)
        self.inp = nn.Linear(IN_FEATURES, hidden)
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(2)])
        self.moes = nn.ModuleList([OmniMoE(cfg) for _ in range(2)])
        self.out = nn.Linear(hidden, 1)
        with torch.no_grad():  # experts start small, as residual branches usually do
            for moe in self.moes:
                moe.up_embed.weight.mul_(1.0 / math.sqrt(hidden))
                moe.down_embed.weight.mul_(1.0 / math.sqrt(hidden))

    def forward(self, x):
        h = self.inp(x)
        for norm, moe in zip(self.norms, self.moes):
            h = h + moe(norm(h))
        return self.out(h).squeeze(-1)


def target(x: torch.Tensor) -> torch.Tensor:
    """A smooth non-linear function of the inputs, variance about 1."""
    return torch.sin(2.0 * x[..., 0]) * torch.cos(1.5 * x[..., 1]) * 2.0 + x[..., 2] * x[..., 3]


def batch(generator: torch.Generator, size: int, device="cpu"):
    x = torch.randn(size, IN_FEATURES, generator=generator).to(device)
    return x, target(x)
