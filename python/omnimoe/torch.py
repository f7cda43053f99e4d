"""omnimoe.torch: the OmniMoE layer as a drop-in PyTorch module over the C++/CUDA library.

    from omnimoe.torch import OmniMoE, OmniMoEConfig
    layer = OmniMoE(OmniMoEConfig(hidden_size=256, intermediate_size=512, hidden_act="silu",
                                  num_experts=64 * 64, num_experts_per_token=32))
    y = layer(x)  # x: (batch, seq, 256) or (tokens, 256), on the CPU or a CUDA device
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch import Tensor

from . import _ops
from .config import OmniMoEConfig
from .reference import OmniMoEBase, OmniMoEReference, reference_layer

__all__ = ["OmniMoE", "OmniMoEConfig", "OmniMoEReference", "omnimoe_layer"]

IMPLEMENTATIONS = ("library", "reference")


def omnimoe_layer(x: Tensor, router_gate_x: Tensor, router_gate_y: Tensor, up_embed: Tensor,
                  down_embed: Tensor, gate_proj: Optional[Tensor] = None,
                  up_proj: Optional[Tensor] = None, down_proj: Optional[Tensor] = None, *,
                  num_experts_per_token: int, hidden_act: str = "silu",
                  gating: str = "softmax", router_norm: str = "batch",
                  running_stats: Optional[tuple] = None, training: bool = True,
                  eps: float = 1e-5, momentum: float = 0.1) -> Tensor:
    """The layer as a differentiable function of tensors.

    Shapes (d hidden, I intermediate, N = N_r * N_c experts):
        x [T, d]; router_gate_x [N_r, d]; router_gate_y [N_c, d]; up_embed, down_embed [N, d];
        gate_proj, up_proj [I, d] and down_proj [d, I], or all None (no shared MLP).
        running_stats: (row_mean [N_r], row_var [N_r], col_mean [N_c], col_var [N_c]) float32,
        required with router_norm = "batch"; updated in place when training.
    All weights share x's dtype (float32, float64, bfloat16, float16) and device.
    Returns y [T, d] in x's dtype.
    """
    stats = tuple(running_stats) if running_stats is not None else (None,) * 4
    if len(stats) != 4:
        raise ValueError("running_stats must be (row_mean, row_var, col_mean, col_var)")
    y, _, *new_stats = torch.ops.omnimoe.layer_forward(
        x, router_gate_x, router_gate_y, up_embed, down_embed, gate_proj, up_proj, down_proj,
        *stats, num_experts_per_token, "silu" if hidden_act == "swish" else hidden_act, gating,
        router_norm, float(eps), float(momentum), bool(training))
    if training and router_norm == "batch":
        with torch.no_grad():
            for old, new in zip(stats, new_stats):
                old.copy_(new)
    return y


class OmniMoE(OmniMoEBase):
    """The OmniMoE layer: y = SwiGLU-MLP(x) + sum_k g_k act(x . W[e_k]) V[e_k], with the K
    experts e_k of each token chosen by the Cartesian-product router.

    Args:
        config: an OmniMoEConfig.
        implementation: "library" (the C++/CUDA library, default) or "reference" (the plain
            PyTorch reference, slow, for debugging); both have the same parameters.
        device, dtype: of the parameters (the batch-norm statistics stay float32).

    Input (batch, seq, hidden_size) or (tokens, hidden_size); output of the same shape and of
    the input's dtype, or of the autocast dtype under torch.autocast (the parameters are cast
    for the op and gradients flow back to them in their own dtype). Every parameter must share
    the input's dtype and device outside autocast. train() / eval() drive the router's batch
    norm: training uses batch statistics and updates running_mean, running_var and
    num_batches_tracked; evaluation uses the running statistics.
    """

    def __init__(self, config: OmniMoEConfig, implementation: str = "library", device=None,
                 dtype=None):
        super().__init__(config, device=device, dtype=dtype)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        self.implementation = implementation

    def forward(self, hidden_states: Tensor) -> Tensor:
        x = self._tokens(hidden_states)
        device_type = x.device.type
        autocast = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        if self.implementation == "reference":
            with torch.autocast(device_type, enabled=False) if autocast else nullcontext():
                y = reference_layer(self, x.to(dtype), self.training)
            return y.view(hidden_states.shape)

        def cast(t: Optional[Tensor]) -> Optional[Tensor]:
            return t if t is None or t.dtype == dtype or not autocast else t.to(dtype)

        if x.stride(-1) != 1:
            x = x.contiguous()
        x = cast(x)
        c = self.config
        stats = (None,) * 4
        norms = (self.router_norm_x, self.router_norm_y)
        if c.router_norm == "batch":
            for norm in norms:
                if norm.momentum is None:
                    raise ValueError("OmniMoE: router_norm_x/y.momentum must be a float "
                                     "(the cumulative average of momentum=None is not supported)")
            stats = (self.router_norm_x.running_mean, self.router_norm_x.running_var,
                     self.router_norm_y.running_mean, self.router_norm_y.running_var)
        training = self.training
        eps = float(self.router_norm_x.eps)
        momentum = float(self.router_norm_x.momentum) if c.router_norm == "batch" else 0.1
        gate_w, up_w, down_w = self._mlp_weights()
        # The op reads float32 statistics and returns the updated ones (it is functional).
        y, _, *new_stats = torch.ops.omnimoe.layer_forward(
            x, cast(self.router_gate_x.weight), cast(self.router_gate_y.weight),
            cast(self.up_embed.weight), cast(self.down_embed.weight), cast(gate_w), cast(up_w),
            cast(down_w), *(None if s is None else s.float() for s in stats),
            c.num_experts_per_token, c.activation, c.gating,
            c.router_norm, eps, momentum, training)
        if c.router_norm == "batch" and training:
            with torch.no_grad():
                for old, new in zip(stats, new_stats):
                    old.copy_(new)
            for norm in norms:
                norm.num_batches_tracked.add_(1)
        return y.view(hidden_states.shape)

