"""state_dict: a round trip through OmniMoE, and checkpoints of a module written the way the
reference implementation writes its module (same attribute names and layouts) loading into
OmniMoE and computing the same layer."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omnimoe.torch import OmniMoE, OmniMoEConfig, OmniMoEReference

from conftest import assert_close, make_config, randomize, random_input


class ReferenceStyleMoE(nn.Module):
    """Written as the reference implementation's module is: a square grid of floor(sqrt(N)),
    batch-normalised logits, log-softmax per axis, top K of all pair sums, gates exp(score)
    (our gating="joint"), and a SwiGLU shared MLP with the same activation (silu here)."""

    def __init__(self, hidden_size, intermediate_size, num_experts, num_experts_per_token):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.side = math.floor(math.sqrt(num_experts))
        self.top_k = num_experts_per_token
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.router_gate_x = nn.Linear(hidden_size, self.side, bias=False)
        self.router_gate_y = nn.Linear(hidden_size, self.side, bias=False)
        self.router_norm_x = nn.BatchNorm1d(self.side, affine=False)
        self.router_norm_y = nn.BatchNorm1d(self.side, affine=False)
        self.up_embed = nn.Embedding(num_experts, hidden_size)
        self.down_embed = nn.Embedding(num_experts, hidden_size)

    def forward(self, hidden_states):
        bsz, seq_len, _ = hidden_states.shape
        flat = hidden_states.view(-1, self.hidden_size)
        logp_x = F.log_softmax(self.router_norm_x(self.router_gate_x(flat)), dim=-1)
        logp_y = F.log_softmax(self.router_norm_y(self.router_gate_y(flat)), dim=-1)
        pair = (logp_x.unsqueeze(-1) + logp_y.unsqueeze(-2)).flatten(-2)
        scores, indices = pair.topk(self.top_k, dim=-1)
        weights = torch.exp(scores)
        h = F.silu(torch.einsum("tkd,td->tk", self.up_embed(indices), flat)) * weights
        experts = torch.einsum("tk,tkd->td", h, self.down_embed(indices))
        mlp = self.down_proj(F.silu(self.gate_proj(flat)) * self.up_proj(flat))
        return (mlp + experts).view(bsz, seq_len, -1)


def test_state_dict_round_trip_f32():
    cfg = make_config()
    a = OmniMoE(cfg)
    randomize(a, 51)
    x = random_input((37, 24), torch.float32, 52)
    a(x)  # one training step moves the statistics and num_batches_tracked
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = OmniMoE(cfg)
    b.load_state_dict(torch.load(buf))
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    a.eval()
    b.eval()
    assert torch.equal(a(x), b(x))


def test_state_dict_names_match_reference_module():
    cfg = make_config()
    names = set(OmniMoE(cfg).state_dict())
    assert names == set(OmniMoEReference(cfg).state_dict())
    ref_style = ReferenceStyleMoE(24, 20, 36, 6)
    assert names == set(ref_style.state_dict())


def _loaded_pair(seed, intermediate=20):
    torch.manual_seed(seed)
    ref_style = ReferenceStyleMoE(24, intermediate, 36, 7).double()
    randomize(ref_style, seed)
    cfg = OmniMoEConfig(hidden_size=24, intermediate_size=intermediate, hidden_act="silu",
                        num_experts=36, num_experts_per_token=7, gating="joint")
    ours = OmniMoE(cfg).double()
    ours.load_state_dict(ref_style.state_dict())  # strict: every name and shape matches
    return ref_style, ours


def test_reference_style_checkpoint_loads_and_computes_the_same_layer():
    ref_style, ours = _loaded_pair(53)
    for training in (True, False):
        ref_style.train(training)
        ours.train(training)
        x = random_input((3, 11, 24), torch.float64, 54 + training)
        x_ours = x.clone().requires_grad_(True)
        x_ref = x.clone().requires_grad_(True)
        y, y_ref = ours(x_ours), ref_style(x_ref)
        assert_close(y, y_ref, torch.float32, 80, f"y (training={training})")
        dy = random_input(y.shape, torch.float64, 56)
        g = torch.autograd.grad(y, [x_ours, *ours.parameters()], dy)
        g_ref = torch.autograd.grad(y_ref, [x_ref, *ref_style.parameters()], dy)
        names = ["x"] + [n for n, _ in ours.named_parameters()]
        for name, a, b in zip(names, g, g_ref):
            assert_close(a, b, torch.float32, 800, f"grad of {name} (training={training})")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        for norm in ("router_norm_x", "router_norm_y"):
            a = getattr(getattr(ours, norm), name)
            b = getattr(getattr(ref_style, norm), name)
            if name == "num_batches_tracked":
                assert int(a) == int(b) == 1
            else:
                assert_close(a, b, torch.float32, 100, f"{norm}.{name}")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_reference_style_checkpoint_without_mlp_loads():
    """intermediate_size 0: the reference module has [0, d] MLP weights, ours has none."""
    ref_style, ours = _loaded_pair(57, intermediate=0)
    assert ours.gate_proj is None
    x = random_input((2, 9, 24), torch.float64, 58)
    ours.eval()
    ref_style.eval()
    assert_close(ours(x), ref_style(x), torch.float32, 80, "y without MLP")
