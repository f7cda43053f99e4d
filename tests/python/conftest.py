"""Shared helpers for the Python tests: module construction with random (never zero)
parameters and statistics, the tolerance policy of tests/support (docs/testing.md), and CUDA
availability."""

from __future__ import annotations

import hashlib
import math
import os
import tempfile

# Two OpenMP runtimes share the cores here (PyTorch's bundled one and the library's); with
# busy-waiting workers each stalls the other on a small, loaded machine. Read at their start.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import pytest
import torch

import omnimoe
from omnimoe.torch import OmniMoE, OmniMoEConfig, OmniMoEReference


def _inductor_cache_for_this_build() -> str:
    """A compiled graph bakes in the size of the saved buffer that the library reported when it
    was traced, and PyTorch's FX-graph and AOT caches do not key on it: a cache filled by
    another build of the extension (another saved layout) replays the stale size and fails
    assert_size_stride. One cache folder per extension binary keeps warm caches and no stale
    ones."""
    digest = hashlib.sha1()
    with open(omnimoe._omnimoe.__file__, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return os.path.join(tempfile.gettempdir(), f"torchinductor_omnimoe_{digest.hexdigest()[:16]}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache_for_this_build())

# (rtol, atol) per storage dtype, widened by sqrt(terms) as tolerance_for() in
# src/core/tolerance.h.
_POLICY = {
    torch.float64: (1e-10, 1e-12, True),
    torch.float32: (2e-5, 1e-6, True),
    torch.bfloat16: (1.6e-2, 1e-2, False),
    torch.float16: (2e-3, 1e-3, False),
}


def tolerance_for(dtype: torch.dtype, terms: int):
    """(rtol, atol): |got - want| <= atol + rtol |want|."""
    rtol, atol, rtol_grows = _POLICY[dtype]
    growth = math.sqrt(max(terms, 1))
    return (rtol * growth if rtol_grows else rtol), atol * growth


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, terms: int,
                 what: str = "", nonzero: bool = True):
    """Compare under the policy of `dtype`; the message names the worst element."""
    rtol, atol = tolerance_for(dtype, terms)
    got64, want64 = got.detach().double().cpu(), want.detach().double().cpu()
    assert got64.shape == want64.shape, f"{what}: shape {got64.shape} != {want64.shape}"
    assert torch.isfinite(got64).all(), f"{what}: non-finite values"
    if nonzero:
        assert want64.abs().max() > 0, f"{what}: the expected values are all zero"
    ratio = (got64 - want64).abs() / (atol + rtol * want64.abs())
    worst = int(ratio.argmax())
    assert ratio.max() <= 1.0, (
        f"{what}: worst ratio {ratio.max():.3g} (1 = at tolerance) at flat index {worst}: "
        f"got {got64.flatten()[worst]:.8g}, want {want64.flatten()[worst]:.8g} "
        f"(rtol {rtol:.3g}, atol {atol:.3g})")


def make_config(d=24, inter=20, grid=(5, 7), k=6, act="silu", gating="softmax",
                norm="batch") -> OmniMoEConfig:
    return OmniMoEConfig(hidden_size=d, intermediate_size=inter, hidden_act=act,
                         num_experts=grid[0] * grid[1], num_experts_per_token=k,
                         expert_grid=grid, gating=gating, router_norm=norm)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Parameters uniform in +-1/sqrt(fan_in) (embeddings too, so the expert pre-activations
    stay O(1)), running statistics random and non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            bound = 1.0 / math.sqrt(max(p.shape[-1], 1))
            p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)


def make_pair(config: OmniMoEConfig, dtype=torch.float32, seed: int = 0, device="cpu"):
    """(library module, reference module) with the same random parameters and statistics."""
    lib = OmniMoE(config).to(dtype)
    randomize(lib, seed)
    ref = OmniMoEReference(config).to(dtype)
    ref.load_state_dict(lib.state_dict())
    return lib.to(device), ref.to(device)


def random_input(shape, dtype=torch.float32, seed: int = 1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def has_cuda() -> bool:
    return torch.cuda.is_available() and omnimoe.cuda_available()


def cuda_skip_reason() -> str:
    if not torch.cuda.is_available():
        return "CUDA tests need a CUDA device (torch.cuda.is_available() is False)"
    return "CUDA tests need omnimoe built with its CUDA backend (omnimoe.cuda_available() is False)"


requires_cuda = pytest.mark.skipif(not has_cuda(), reason=cuda_skip_reason())
