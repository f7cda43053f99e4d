"""torch.compile(fullgraph=True) of a model that uses the module: same outputs, gradients and
batch-norm statistics as eager, in training and evaluation."""

from __future__ import annotations

import copy

import torch
from torch import nn

from omnimoe.torch import OmniMoE

from conftest import assert_close, make_config, randomize, random_input


class Block(nn.Module):
    """A residual block around the layer, with ops on either side for the compiler to fuse."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.moe = OmniMoE(cfg)
        self.head = nn.Linear(cfg.hidden_size, 3)

    def forward(self, x):
        h = x + self.moe(self.norm(x))
        return self.head(torch.tanh(h))


def _pair(seed):
    torch.manual_seed(seed)
    cfg = make_config()
    eager = Block(cfg)
    randomize(eager.moe, seed)
    compiled_module = copy.deepcopy(eager)
    return eager, compiled_module, torch.compile(compiled_module, fullgraph=True)


def _close_modules(a, b, what):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert_close(pb.grad, pa.grad, torch.float32, 2000, f"{what}: grad of {name}")
    for (name, ba), bb in zip(a.named_buffers(), b.buffers()):
        if ba.dtype == torch.long:
            assert torch.equal(ba, bb), f"{what}: {name} {int(bb)} != {int(ba)}"
        else:
            assert_close(bb, ba, torch.float32, 100, f"{what}: {name}")


def test_compile_fullgraph_train_step_matches_eager():
    eager, module, compiled = _pair(41)
    for step in range(2):  # the second call reuses the compiled graph
        x = random_input((2, 19, 24), torch.float32, 42 + step)
        for m in (eager, module):
            m.zero_grad(set_to_none=True)
        y_eager = eager(x)
        y = compiled(x)
        assert_close(y, y_eager, torch.float32, 200, f"step {step}: y")
        y_eager.square().sum().backward()
        y.square().sum().backward()
        _close_modules(eager, module, f"step {step}")
    assert int(module.moe.router_norm_x.num_batches_tracked) == 2


def test_compile_fullgraph_eval_matches_eager():
    eager, module, compiled = _pair(43)
    eager.eval()
    module.eval()
    x = random_input((37, 24), torch.float32, 44)
    with torch.no_grad():
        assert_close(compiled(x), eager(x), torch.float32, 200, "y (eval)")
    assert int(module.moe.router_norm_x.num_batches_tracked) == 0


def test_compile_fullgraph_varying_token_counts():
    """A second token count makes torch.compile trace with a symbolic count (the saved
    buffer's size is then data-dependent); results still match eager."""
    eager, module, compiled = _pair(45)
    for tokens in (37, 41, 50):
        x = random_input((tokens, 24), torch.float32, tokens)
        for m in (eager, module):
            m.zero_grad(set_to_none=True)
        y, y_eager = compiled(x), eager(x)
        assert_close(y, y_eager, torch.float32, 200, f"T={tokens}: y")
        y.sum().backward()
        y_eager.sum().backward()
        _close_modules(eager, module, f"T={tokens}")
