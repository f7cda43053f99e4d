"""OmniMoEConfig: the layer's configuration, shared by the library module and the reference."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

ACTIVATIONS = ("silu", "swish", "gelu", "relu")
GATINGS = ("softmax", "joint")
ROUTER_NORMS = ("batch", "none")


@dataclass
class OmniMoEConfig:
    """Configuration of one OmniMoE layer.

    The first five names are those of the reference implementation, so its configs carry over.

    Args:
        hidden_size: d, the width of the input and output.
        intermediate_size: I, the width of the shared SwiGLU MLP; 0 disables the MLP.
        hidden_act: activation of the atomic experts: "silu" (or "swish"), "gelu" (exact, erf)
            or "relu". The shared MLP is SwiGLU and always uses silu.
        num_experts: N, the number of atomic experts; must equal N_r * N_c.
        num_experts_per_token: K, experts selected per token, in [1, N].
        expert_grid: (N_r, N_c), the router's grid. Default: (sqrt(N), sqrt(N)), and an error
            when N is not a perfect square (never a silent rounding).
        gating: "softmax" (softmax over the K selected scores, the paper's Eq. 2) or "joint"
            (exp of the score, P_r(i) * P_c(j), as the reference code).
        router_norm: "batch" (batch norm of the router logits over tokens, no affine, as the
            reference code) or "none".
    """

    hidden_size: int
    intermediate_size: int
    hidden_act: str
    num_experts: int
    num_experts_per_token: int
    expert_grid: Optional[Tuple[int, int]] = None
    gating: str = "softmax"
    router_norm: str = "batch"
    grid: Tuple[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_experts", "num_experts_per_token"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"OmniMoEConfig.{name} must be an int, got {value!r}")
        if self.hidden_size < 1:
            raise ValueError(f"OmniMoEConfig.hidden_size must be >= 1, got {self.hidden_size}")
        if self.intermediate_size < 0:
            raise ValueError(
                "OmniMoEConfig.intermediate_size must be >= 0 (0 disables the shared MLP), "
                f"got {self.intermediate_size}")
        if self.num_experts < 1:
            raise ValueError(f"OmniMoEConfig.num_experts must be >= 1, got {self.num_experts}")
        if self.expert_grid is None:
            root = math.isqrt(self.num_experts)
            if root * root != self.num_experts:
                raise ValueError(
                    f"OmniMoEConfig.num_experts = {self.num_experts} is not a perfect square; "
                    "pass expert_grid=(N_r, N_c) with N_r * N_c == num_experts")
            grid = (root, root)
        else:
            grid = tuple(self.expert_grid)
            if len(grid) != 2 or not all(isinstance(v, int) and v >= 1 for v in grid):
                raise ValueError(
                    f"OmniMoEConfig.expert_grid must be two ints >= 1, got {self.expert_grid!r}")
            if grid[0] * grid[1] != self.num_experts:
                raise ValueError(
                    f"OmniMoEConfig.expert_grid = {grid} holds {grid[0] * grid[1]} experts, "
                    f"but num_experts = {self.num_experts}")
        self.grid = grid
        if not 1 <= self.num_experts_per_token <= self.num_experts:
            raise ValueError(
                f"OmniMoEConfig.num_experts_per_token must be in [1, {self.num_experts}], "
                f"got {self.num_experts_per_token}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"OmniMoEConfig.hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.gating not in GATINGS:
            raise ValueError(f"OmniMoEConfig.gating must be one of {GATINGS}, got {self.gating!r}")
        if self.router_norm not in ROUTER_NORMS:
            raise ValueError(
                f"OmniMoEConfig.router_norm must be one of {ROUTER_NORMS}, "
                f"got {self.router_norm!r}")

    @property
    def activation(self) -> str:
        """The activation's canonical name ("swish" is "silu")."""
        return "silu" if self.hidden_act == "swish" else self.hidden_act
