"""CPU: the library module against the plain-PyTorch reference, values, gradients, routing and
running statistics, over the options and odd sizes."""

from __future__ import annotations

import pytest
import torch

from omnimoe import _omnimoe as ext
from omnimoe._ops import layer_config

from conftest import assert_close, make_config, make_pair, random_input

# name -> config keyword arguments; tokens are odd (37) and the grid is not square.
CASES = {
    "d24_I20_Nr5_Nc7_K6": {},
    "K1": {"k": 1},
    "KeqN": {"k": 35},
    "I0_no_mlp": {"inter": 0},
    "gating_joint": {"gating": "joint"},
    "norm_none": {"norm": "none"},
    "act_gelu": {"act": "gelu"},
    "act_relu": {"act": "relu"},
    "d33_square_grid_Nr6_Nc6_K11": {"d": 33, "grid": (6, 6), "k": 11, "inter": 7},
}


def _terms(cfg, tokens):
    return cfg.hidden_size + cfg.num_experts_per_token + cfg.intermediate_size + tokens


def _check_layer(cfg, dtype, training, x_shape, seed=0, strided=False):
    lib, ref = make_pair(cfg, dtype, seed)
    lib.train(training)
    ref.train(training)
    x = random_input(x_shape, dtype, seed + 1)
    if strided:  # rows with padding: the library reads them with a row stride
        wide = random_input(x_shape[:-1] + (x_shape[-1] + 5,), dtype, seed + 1)
        x = wide[..., 2:2 + x_shape[-1]]
        assert x.stride(-2) != x.shape[-1]
    x_lib = x.clone().requires_grad_(True) if not strided else x.detach().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = lib(x_lib)
    y_ref = ref(x_ref)
    tokens = x.numel() // x.shape[-1]
    # Router internals are fp32 by contract, so fp64 storage is held to the fp32 policy.
    policy = torch.float32 if dtype == torch.float64 else dtype
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, y_ref, policy, _terms(cfg, tokens), "y")

    dy = random_input(y.shape, dtype, seed + 2)
    grads = torch.autograd.grad(y, [x_lib, *lib.parameters()], dy)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *ref.parameters()], dy)
    names = ["x"] + [n for n, _ in lib.named_parameters()]
    # With K = 1 and softmax gating every gate is 1: no gradient reaches the router.
    router_blind = cfg.num_experts_per_token == 1 and cfg.gating == "softmax"
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close(g, g_ref, policy, _terms(cfg, tokens) * cfg.num_experts_per_token,
                     f"grad of {name}", nonzero=not (router_blind and "router" in name))

    if cfg.router_norm == "batch":
        for norm in ("router_norm_x", "router_norm_y"):
            a, b = getattr(lib, norm), getattr(ref, norm)
            assert_close(a.running_mean, b.running_mean, torch.float32, tokens,
                         f"{norm}.running_mean")
            assert_close(a.running_var, b.running_var, torch.float32, tokens,
                         f"{norm}.running_var")
            assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == int(training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_f32_T37_matches_reference(case, training):
    _check_layer(make_config(**CASES[case]), torch.float32, training, (37, CASES[case].get("d", 24)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", ["d24_I20_Nr5_Nc7_K6", "gating_joint", "I0_no_mlp"])
def test_f64_T37_matches_reference(case, training):
    _check_layer(make_config(**CASES[case]), torch.float64, training, (37, 24), seed=3)


def test_f32_batch3_seq13_input_3d():
    _check_layer(make_config(), torch.float32, True, (3, 13, 24), seed=5)


def test_f32_T37_strided_rows():
    _check_layer(make_config(), torch.float32, True, (37, 24), seed=7, strided=True)


def test_f32_last_dim_not_contiguous_is_copied():
    cfg = make_config()
    lib, ref = make_pair(cfg, torch.float32, 11)
    x = random_input((24, 37), torch.float32, 12).t()  # stride (1, 37)
    assert x.stride(-1) != 1
    assert_close(lib(x), ref(x), torch.float32, _terms(cfg, 37), "y")


def test_f32_T37_routing_matches_reference():
    """The selection itself: indices (descending score, ties by id), scores and gates."""
    from omnimoe.reference import reference_layer

    cfg = make_config(k=9)
    lib, ref = make_pair(cfg, torch.float32, 13)
    x = random_input((37, 24), torch.float32, 14)
    stats = [s.clone() for s in (lib.router_norm_x.running_mean, lib.router_norm_x.running_var,
                                 lib.router_norm_y.running_mean, lib.router_norm_y.running_var)]
    _, saved, *_ = torch.ops.omnimoe.layer_forward(
        x, lib.router_gate_x.weight, lib.router_gate_y.weight, lib.up_embed.weight,
        lib.down_embed.weight, lib.gate_proj.weight, lib.up_proj.weight, lib.down_proj.weight,
        *stats, cfg.num_experts_per_token, "silu", "softmax", "batch", 1e-5, 0.1, True)
    c = layer_config(24, 5, 7, 9, cfg.intermediate_size, "silu", "softmax", "batch", 1e-5, 0.1)
    layout = ext.saved_layout(c, 37, "f32")
    assert layout["bytes"] == saved.numel()

    def view(name, dtype):
        n = 37 * 9 * 4
        return saved[layout[name]:layout[name] + n].view(dtype).view(37, 9)

    _, (indices, scores, gates) = reference_layer(ref, x, True, return_routing=True)
    assert torch.equal(view("indices", torch.int32).long(), indices)
    assert_close(view("scores", torch.float32), scores, torch.float32, 48, "scores")
    assert_close(view("gates", torch.float32), gates, torch.float32, 48, "gates")
    assert (view("scores", torch.float32).diff(dim=-1) <= 0).all(), "scores not descending"


def test_f32_eval_is_deterministic_and_leaves_statistics():
    lib, _ = make_pair(make_config(), torch.float32, 17)
    lib.eval()
    x = random_input((37, 24), torch.float32, 18)
    before = {k: v.clone() for k, v in lib.state_dict().items()}
    y1, y2 = lib(x), lib(x)
    assert torch.equal(y1, y2)
    for k, v in lib.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in eval mode"


def test_f32_training_updates_statistics_every_step():
    lib, ref = make_pair(make_config(), torch.float32, 19)
    for step in range(3):
        x = random_input((37, 24), torch.float32, 20 + step)
        lib(x)
        ref(x)
    for norm in ("router_norm_x", "router_norm_y"):
        a, b = getattr(lib, norm), getattr(ref, norm)
        assert int(a.num_batches_tracked) == 3
        assert_close(a.running_mean, b.running_mean, torch.float32, 100, norm)
        assert_close(a.running_var, b.running_var, torch.float32, 100, norm)


def test_bf16_autocast_cpu_matches_reference():
    cfg = make_config()
    lib, ref = make_pair(cfg, torch.float32, 23)
    x = random_input((37, 24), torch.float32, 24)
    x_lib = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lib(x_lib)
        y_ref = ref(x)
    assert y.dtype == torch.bfloat16
    assert_close(y, y_ref, torch.bfloat16, _terms(cfg, 37), "y under autocast")
    y.float().square().sum().backward()
    for name, p in lib.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert p.grad.abs().max() > 0, f"{name}: zero gradient under autocast"
    assert x_lib.grad.dtype == torch.float32


def test_bf16_params_T37_matches_f32_reference():
    """bf16 storage end to end (no autocast) against the reference on the same bf16 values."""
    cfg = make_config()
    lib, ref = make_pair(cfg, torch.bfloat16, 29)
    ref.float()
    x = random_input((37, 24), torch.bfloat16, 30)
    y = lib(x)
    assert y.dtype == torch.bfloat16
    assert_close(y, ref(x.float()), torch.bfloat16, _terms(cfg, 37), "y")


def test_empty_batch_returns_empty():
    lib, _ = make_pair(make_config(), torch.float32, 31)
    lib.eval()
    y = lib(torch.randn(0, 24))
    assert y.shape == (0, 24)
