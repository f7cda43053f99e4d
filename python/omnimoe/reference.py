"""Plain-PyTorch reference of the OmniMoE layer (SPEC.md), for tests and for debugging.

It scores all N experts of every token and gathers K expert rows per token (O(T*N) and
O(T*K*d) memory), so it is for small sizes. Its parameters, buffers and their names are those
of omnimoe.torch.OmniMoE and of the reference implementation's module, so a state_dict moves
between the three with load_state_dict.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import OmniMoEConfig

_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


class OmniMoEBase(nn.Module):
    """Parameters and input handling shared by the library module and the reference.

    Parameters (shapes as nn.Linear / nn.Embedding store them; d = hidden_size,
    I = intermediate_size, N = num_experts, (N_r, N_c) = expert_grid):
        gate_proj.weight, up_proj.weight [I, d], down_proj.weight [d, I] (absent when I = 0)
        router_gate_x.weight [N_r, d], router_gate_y.weight [N_c, d]
        up_embed.weight, down_embed.weight [N, d]
    Buffers: router_norm_x (N_r) and router_norm_y (N_c) are nn.BatchNorm1d(affine=False):
        running_mean, running_var, num_batches_tracked.
    """

    def __init__(self, config: OmniMoEConfig, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, OmniMoEConfig):
            raise TypeError(f"config must be an OmniMoEConfig, got {type(config).__name__}")
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_token
        self.grid_rows, self.grid_cols = config.grid
        kw = {"device": device, "dtype": dtype}
        d, inter = config.hidden_size, config.intermediate_size

        if inter > 0:
            self.gate_proj = nn.Linear(d, inter, bias=False, **kw)
            self.up_proj = nn.Linear(d, inter, bias=False, **kw)
            self.down_proj = nn.Linear(inter, d, bias=False, **kw)
        else:
            self.gate_proj = self.up_proj = self.down_proj = None

        self.router_gate_x = nn.Linear(d, self.grid_rows, bias=False, **kw)
        self.router_gate_y = nn.Linear(d, self.grid_cols, bias=False, **kw)
        # The statistics stay float32 whatever dtype the weights have.
        self.router_norm_x = nn.BatchNorm1d(self.grid_rows, affine=False, device=device)
        self.router_norm_y = nn.BatchNorm1d(self.grid_cols, affine=False, device=device)

        self.up_embed = nn.Embedding(self.num_experts, d, **kw)
        self.down_embed = nn.Embedding(self.num_experts, d, **kw)
        self._register_load_state_dict_pre_hook(self._drop_empty_mlp)

    def _drop_empty_mlp(self, state_dict, prefix, *args):
        # A module written as the reference is has [0, d] MLP weights when I = 0; we have none.
        if self.intermediate_size == 0:
            for name in _MLP_NAMES:
                key = f"{prefix}{name}.weight"
                if key in state_dict and state_dict[key].numel() == 0:
                    del state_dict[key]

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden_size={c.hidden_size}, intermediate_size={c.intermediate_size}, "
                f"num_experts={c.num_experts} ({self.grid_rows}x{self.grid_cols}), "
                f"top_k={c.num_experts_per_token}, act={c.activation}, gating={c.gating}, "
                f"router_norm={c.router_norm}")

    def _tokens(self, hidden_states: Tensor) -> Tensor:
        """(batch, seq, d) or (tokens, d) -> (tokens, d), with a clear error otherwise."""
        if not isinstance(hidden_states, Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states)}")
        if hidden_states.dim() not in (2, 3) or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                "hidden_states must have shape (batch, seq, hidden_size) or (tokens, hidden_size) "
                f"with hidden_size = {self.hidden_size}, got {tuple(hidden_states.shape)}")
        return hidden_states.reshape(-1, self.hidden_size)

    def _mlp_weights(self) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        if self.gate_proj is None:
            return None, None, None
        return self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight


def _activation(name: str):
    return {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}[name]


def _batch_norm(norm: nn.BatchNorm1d, logits: Tensor, training: bool) -> Tensor:
    """nn.BatchNorm1d(affine=False) on logits of any float dtype, statistics kept in theirs."""
    momentum = norm.momentum
    if training:
        norm.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative average, as nn.BatchNorm1d
            momentum = 1.0 / float(norm.num_batches_tracked)
    mean, var = norm.running_mean, norm.running_var
    if mean.dtype == logits.dtype:
        return F.batch_norm(logits, mean, var, None, None, training, momentum, norm.eps)
    mean_c, var_c = mean.to(logits.dtype), var.to(logits.dtype)
    out = F.batch_norm(logits, mean_c, var_c, None, None, training, momentum, norm.eps)
    if training:
        with torch.no_grad():
            mean.copy_(mean_c)
            var.copy_(var_c)
    return out


def reference_layer(module: OmniMoEBase, x: Tensor, training: bool,
                    return_routing: bool = False):
    """The layer of SPEC.md in plain PyTorch, on x [T, d]; returns y [T, d] in x's dtype.

    Router: logits, batch norm (training: batch statistics and running-stat update), log-softmax
    in at least fp32; all N pair scores; the top K by a stable sort on fp32 keys (ties: smaller
    expert id; a NaN ranks as -inf); gates softmax over the K or exp(score). Experts and MLP
    accumulate in at least fp32. With return_routing, also returns (indices [T, K] int64,
    scores [T, K], gates [T, K]).
    """
    cfg = module.config
    acc = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc)

    def weight(t: Tensor) -> Tensor:  # rounded to x's dtype first, as the library sees it
        return t.to(x.dtype).to(acc)

    tokens = x.shape[0]

    def logp(gate: nn.Linear, norm: nn.BatchNorm1d) -> Tensor:
        logits = xa @ weight(gate.weight).t()
        if cfg.router_norm == "batch":
            logits = _batch_norm(norm, logits, training)
        return F.log_softmax(logits, dim=-1)

    lr = logp(module.router_gate_x, module.router_norm_x)
    lc = logp(module.router_gate_y, module.router_norm_y)
    scores_all = (lr[:, :, None] + lc[:, None, :]).reshape(tokens, cfg.num_experts)
    keys = torch.nan_to_num(scores_all.detach().float(), nan=float("-inf"))
    indices = torch.sort(keys, dim=-1, descending=True, stable=True).indices
    indices = indices[:, :cfg.num_experts_per_token]
    scores = scores_all.gather(-1, indices)
    gates = torch.softmax(scores, dim=-1) if cfg.gating == "softmax" else torch.exp(scores)

    up = weight(module.up_embed.weight)[indices]        # [T, K, d]
    down = weight(module.down_embed.weight)[indices]    # [T, K, d]
    preact = torch.einsum("tkd,td->tk", up, xa)
    h = _activation(cfg.hidden_act)(preact)
    y = torch.einsum("tk,tkd->td", gates.to(acc) * h, down)

    if module.gate_proj is not None:
        gate_w, up_w, down_w = (weight(w) for w in module._mlp_weights())
        y = y + (F.silu(xa @ gate_w.t()) * (xa @ up_w.t())) @ down_w.t()
    y = y.to(x.dtype)
    if return_routing:
        return y, (indices, scores, gates)
    return y


class OmniMoEReference(OmniMoEBase):
    """The OmniMoE layer in plain PyTorch (slow; for tests and debugging).

    Input (batch, seq, hidden_size) or (tokens, hidden_size); output of the same shape. Under
    autocast the layer runs in the autocast dtype, as omnimoe.torch.OmniMoE does.
    """

    def forward(self, hidden_states: Tensor) -> Tensor:
        x = self._tokens(hidden_states)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                y = reference_layer(self, x.to(dtype), self.training)
        else:
            y = reference_layer(self, x, self.training)
        return y.view(hidden_states.shape)
