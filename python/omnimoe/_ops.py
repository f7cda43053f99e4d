"""The layer as PyTorch ops: torch.library custom ops over the binding, with fake (meta)
implementations and an autograd formula, so torch.compile, CUDA graphs and gradcheck work.

omnimoe::layer_forward  (x, weights, running stats, options) -> (y, saved, running stats)
omnimoe::layer_backward (dy, x, weights, saved, options) -> (dx, weight grads)

Every tensor the library writes (y, saved, gradients, workspace) is allocated here by PyTorch
(the caching allocator on CUDA), sized by the library's queries; the library only fills it, on
the current CUDA stream.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.dlpack import to_dlpack

from . import _omnimoe as _ext

_DTYPE_NAMES = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(
            f"omnimoe: x must be float32, float64, bfloat16 or float16, got {dtype}") from None


@functools.lru_cache(maxsize=256)
def layer_config(hidden: int, grid_rows: int, grid_cols: int, top_k: int, intermediate: int,
                 act: str, gating: str, router_norm: str, eps: float,
                 momentum: float) -> "_ext.LayerConfig":
    """A validated C++ LayerConfig (cached: the op calls build it every step)."""
    return _ext.layer_config(hidden, grid_rows, grid_cols, top_k, intermediate, act, gating,
                             router_norm, eps, momentum)


def _config(x: Tensor, row: Tensor, col: Tensor, mlp_gate: Optional[Tensor], top_k: int,
            act: str, gating: str, router_norm: str, eps: float, momentum: float):
    # The sizes come from the tensors; the launchers check that they agree with each other.
    intermediate = 0 if mlp_gate is None else int(mlp_gate.shape[0])
    return layer_config(int(x.shape[-1]), int(row.shape[0]), int(col.shape[0]), top_k,
                        intermediate, act, gating, router_norm, eps, momentum)


def _dl(t: Optional[Tensor]):
    # A DLPack capsule of the tensor as it is: no stream synchronisation (the library runs on
    # the stream passed explicitly), no autograd (the ops below are the autograd boundary).
    return None if t is None else to_dlpack(t.detach())


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _threads(device: torch.device) -> int:
    return torch.get_num_threads() if device.type == "cpu" else 0


def _bytes(n: int, device: torch.device) -> Tensor:
    return torch.empty((n,), dtype=torch.uint8, device=device)


def _check_x(x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"omnimoe: x must be 2-D (tokens, hidden), got shape {tuple(x.shape)}")
    dtype_name(x.dtype)


@torch.library.custom_op("omnimoe::layer_forward", mutates_args=())
def layer_forward(x: Tensor, row: Tensor, col: Tensor, up: Tensor, down: Tensor,
                  mlp_gate: Optional[Tensor], mlp_up: Optional[Tensor],
                  mlp_down: Optional[Tensor], row_mean: Optional[Tensor],
                  row_var: Optional[Tensor], col_mean: Optional[Tensor],
                  col_var: Optional[Tensor], top_k: int, act: str, gating: str,
                  router_norm: str, eps: float, momentum: float,
                  training: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y [T, d] = layer(x [T, d]), the saved buffer (uint8) that backward reads, and the
    running statistics after this step (float32 copies, updated when training with
    router_norm = "batch"; empty tensors without them). A functional op, so that it can carry
    an autograd formula: the caller copies the statistics back into its buffers."""
    _check_x(x)
    cfg = _config(x, row, col, mlp_gate, top_k, act, gating, router_norm, eps, momentum)
    tokens, dev, dt = x.shape[0], x.device, dtype_name(x.dtype)
    y = torch.empty(x.shape, dtype=x.dtype, device=dev)
    saved = _bytes(_ext.layer_saved_bytes(cfg, tokens, dt), dev)
    workspace = _bytes(
        _ext.layer_forward_workspace_bytes(cfg, tokens, dt, dev.type, dev.index or 0), dev)
    stats = [x.new_empty((0,), dtype=torch.float32) if s is None else s.clone()
             for s in (row_mean, row_var, col_mean, col_var)]
    given = [None if s is None else t for s, t in zip((row_mean, row_var, col_mean, col_var),
                                                       stats)]
    _ext.layer_forward(cfg, _dl(x), _dl(row), _dl(col), _dl(up), _dl(down), _dl(mlp_gate),
                       _dl(mlp_up), _dl(mlp_down), *(_dl(s) for s in given), training, _dl(y),
                       _dl(saved), _dl(workspace), _stream(dev), _threads(dev))
    return (y, saved, *stats)


@layer_forward.register_fake
def _layer_forward_fake(x, row, col, up, down, mlp_gate, mlp_up, mlp_down, row_mean, row_var,
                        col_mean, col_var, top_k, act, gating, router_norm, eps, momentum,
                        training):
    _check_x(x)
    cfg = _config(x, row, col, mlp_gate, top_k, act, gating, router_norm, eps, momentum)
    tokens = x.shape[0]
    if isinstance(tokens, int):
        nbytes = _ext.layer_saved_bytes(cfg, tokens, dtype_name(x.dtype))
    else:  # a symbolic token count: the saved size is not a formula PyTorch can trace
        nbytes = torch.library.get_ctx().new_dynamic_size()
    stats = [x.new_empty((0,), dtype=torch.float32) if s is None else torch.empty_like(s)
             for s in (row_mean, row_var, col_mean, col_var)]
    return (x.new_empty(x.shape), x.new_empty((nbytes,), dtype=torch.uint8), *stats)


@torch.library.custom_op("omnimoe::layer_backward", mutates_args=())
def layer_backward(dy: Tensor, x: Tensor, row: Tensor, col: Tensor, up: Tensor, down: Tensor,
                   mlp_gate: Optional[Tensor], mlp_up: Optional[Tensor],
                   mlp_down: Optional[Tensor], saved: Tensor, top_k: int, act: str,
                   gating: str, router_norm: str, eps: float, momentum: float,
                   training: bool) -> List[Tensor]:
    """[dx, d_row, d_col, d_up, d_down, d_mlp_gate, d_mlp_up, d_mlp_down] from dy and the saved
    buffer of the matching forward; the MLP gradients are empty tensors when there is no MLP."""
    cfg = _config(x, row, col, mlp_gate, top_k, act, gating, router_norm, eps, momentum)
    tokens, dev, dt = x.shape[0], x.device, dtype_name(x.dtype)
    dx = torch.empty(x.shape, dtype=x.dtype, device=dev)
    weights = (row, col, up, down)
    grads = [torch.empty(w.shape, dtype=w.dtype, device=dev) for w in weights]
    mlp = (mlp_gate, mlp_up, mlp_down)
    mlp_grads = [None if w is None else torch.empty(w.shape, dtype=w.dtype, device=dev)
                 for w in mlp]
    workspace = _bytes(
        _ext.layer_backward_workspace_bytes(cfg, tokens, dt, dev.type, dev.index or 0), dev)
    _ext.layer_backward(cfg, _dl(x), _dl(row), _dl(col), _dl(up), _dl(down), _dl(mlp_gate),
                        _dl(mlp_up), _dl(mlp_down), training, _dl(saved), _dl(dy), _dl(dx),
                        *(_dl(g) for g in grads), *(_dl(g) for g in mlp_grads),
                        _dl(workspace), _stream(dev), _threads(dev))
    return [dx, *grads, *(x.new_empty((0,)) if g is None else g for g in mlp_grads)]


@layer_backward.register_fake
def _layer_backward_fake(dy, x, row, col, up, down, mlp_gate, mlp_up, mlp_down, saved, top_k,
                         act, gating, router_norm, eps, momentum, training):
    out = [x.new_empty(x.shape)]
    out += [w.new_empty(w.shape) for w in (row, col, up, down)]
    out += [x.new_empty((0,)) if w is None else w.new_empty(w.shape)
            for w in (mlp_gate, mlp_up, mlp_down)]
    return out


_OPTIONS = slice(12, 19)  # top_k .. training in layer_forward's inputs


def _setup_context(ctx, inputs, output):
    x, row, col, up, down, mlp_gate, mlp_up, mlp_down = inputs[:8]
    saved = output[1]
    ctx.save_for_backward(x, row, col, up, down, mlp_gate, mlp_up, mlp_down, saved)
    ctx.options = inputs[_OPTIONS]
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, dy, *_non_differentiable):
    x, row, col, up, down, mlp_gate, mlp_up, mlp_down, saved = ctx.saved_tensors
    # The library reads rows with a stride but needs the last dimension dense; a gradient that
    # arrives broadcast (from .sum()) has stride 0 there.
    grads = torch.ops.omnimoe.layer_backward(dy.contiguous(), x, row, col, up, down, mlp_gate,
                                             mlp_up, mlp_down, saved, *ctx.options)
    has_mlp = mlp_gate is not None
    mlp = grads[5:8] if has_mlp else [None, None, None]
    return (*grads[:5], *mlp, None, None, None, None) + (None,) * 7


torch.library.register_autograd("omnimoe::layer_forward", _backward,
                                setup_context=_setup_context)
