"""Bad input is an error with a message that names the argument, the expectation and the
value: wrong dtype, device, shape and configuration."""

from __future__ import annotations

import pytest
import torch

import omnimoe
from omnimoe.torch import OmniMoE, OmniMoEConfig, omnimoe_layer

from conftest import make_config, make_pair, random_input, requires_cuda


def _config(**kw):
    args = dict(hidden_size=8, intermediate_size=4, hidden_act="silu", num_experts=16,
                num_experts_per_token=2)
    args.update(kw)
    return OmniMoEConfig(**args)


# ---- configuration -------------------------------------------------------------------------

def test_config_default_grid_is_exact_square_root():
    assert _config(num_experts=36).grid == (6, 6)


def test_config_num_experts_not_square_without_grid():
    with pytest.raises(ValueError, match=r"num_experts = 12 is not a perfect square"):
        _config(num_experts=12)


def test_config_grid_must_multiply_to_num_experts():
    with pytest.raises(ValueError, match=r"expert_grid = \(3, 5\) holds 15 experts, but "
                                         r"num_experts = 16"):
        _config(expert_grid=(3, 5))
    assert _config(num_experts=15, expert_grid=(3, 5)).grid == (3, 5)


@pytest.mark.parametrize("k", [0, 17])
def test_config_top_k_out_of_range(k):
    with pytest.raises(ValueError, match=rf"num_experts_per_token must be in \[1, 16\], got {k}"):
        _config(num_experts_per_token=k)


@pytest.mark.parametrize("field,value,message", [
    ("hidden_act", "tanh", r"hidden_act must be one of .*got 'tanh'"),
    ("gating", "sigmoid", r"gating must be one of .*got 'sigmoid'"),
    ("router_norm", "layer", r"router_norm must be one of .*got 'layer'"),
    ("intermediate_size", -1, r"intermediate_size must be >= 0 .*got -1"),
    ("hidden_size", 0, r"hidden_size must be >= 1, got 0"),
    ("expert_grid", (4, 4, 1), r"expert_grid must be two ints >= 1"),
])
def test_config_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        _config(**{field: value})


def test_config_non_int_size():
    with pytest.raises(TypeError, match=r"num_experts must be an int, got 16.0"):
        _config(num_experts=16.0)


def test_module_needs_a_config():
    with pytest.raises(TypeError, match="config must be an OmniMoEConfig"):
        OmniMoE({"hidden_size": 8})


def test_module_unknown_implementation():
    with pytest.raises(ValueError, match="implementation must be one of"):
        OmniMoE(_config(), implementation="triton")


# ---- shapes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 9), (2, 5, 9), (40,), (2, 2, 5, 8)])
def test_input_shape(shape):
    layer = OmniMoE(_config())
    with pytest.raises(ValueError, match=r"hidden_states must have shape \(batch, seq, "
                                         r"hidden_size\) or \(tokens, hidden_size\) with "
                                         r"hidden_size = 8"):
        layer(torch.randn(shape))


def test_weight_shape_is_checked_by_the_library():
    cfg = make_config()
    lib, _ = make_pair(cfg)
    x = random_input((9, 24))
    bad_down = torch.randn(cfg.num_experts + 1, 24)
    with pytest.raises(omnimoe.Error, match=r"must have shape \[35, 24\], got \[36, 24\]"):
        omnimoe_layer(x, lib.router_gate_x.weight, lib.router_gate_y.weight,
                      lib.up_embed.weight, bad_down, lib.gate_proj.weight, lib.up_proj.weight,
                      lib.down_proj.weight, num_experts_per_token=6, router_norm="none")


def test_training_batch_norm_needs_two_tokens():
    layer = OmniMoE(_config())
    with pytest.raises(omnimoe.Error, match=r"router_norm=batch in training needs more than 1 token per batch, got 1"):
        layer(torch.randn(1, 8))
    layer.eval()
    assert layer(torch.randn(1, 8)).shape == (1, 8)


def test_mlp_weights_all_or_none():
    cfg = make_config()
    lib, _ = make_pair(cfg)
    x = random_input((9, 24))
    with pytest.raises(omnimoe.Error, match=r"gate_proj, up_proj and down_proj weights are "
                                            r"all required"):
        omnimoe_layer(x, lib.router_gate_x.weight, lib.router_gate_y.weight,
                      lib.up_embed.weight, lib.down_embed.weight, lib.gate_proj.weight, None,
                      lib.down_proj.weight, num_experts_per_token=6, router_norm="none")


def test_batch_norm_needs_running_statistics():
    cfg = make_config()
    lib, _ = make_pair(cfg)
    with pytest.raises(omnimoe.Error, match=r"router_norm is batch, so the running mean"):
        omnimoe_layer(random_input((9, 24)), lib.router_gate_x.weight,
                      lib.router_gate_y.weight, lib.up_embed.weight, lib.down_embed.weight,
                      lib.gate_proj.weight, lib.up_proj.weight, lib.down_proj.weight,
                      num_experts_per_token=6, router_norm="batch")


# ---- dtypes ---------------------------------------------------------------------------------

def test_integer_input_dtype():
    layer = OmniMoE(_config())
    with pytest.raises(TypeError, match=r"x must be float32, float64, bfloat16 or float16, "
                                        r"got torch.int64"):
        layer(torch.ones(4, 8, dtype=torch.long))


def test_input_dtype_differs_from_parameters():
    layer = OmniMoE(_config())
    with pytest.raises(omnimoe.Error, match=r"router_gate_x.weight must have dtype f64 \(the "
                                            r"dtype of x\), got f32"):
        layer(torch.randn(4, 8, dtype=torch.float64))


def test_one_parameter_in_another_dtype():
    layer = OmniMoE(_config())
    layer.up_embed.to(torch.bfloat16)
    with pytest.raises(omnimoe.Error, match=r"up_embed.weight must have dtype f32 \(the dtype "
                                            r"of x\), got bf16"):
        layer(torch.randn(4, 8))


def test_statistics_must_be_float32_in_the_op():
    cfg = make_config()
    lib, _ = make_pair(cfg)
    stats = [s.double() for s in (lib.router_norm_x.running_mean, lib.router_norm_x.running_var,
                                  lib.router_norm_y.running_mean, lib.router_norm_y.running_var)]
    with pytest.raises(omnimoe.Error, match=r"router_norm_x.running_mean must have dtype f32 "
                                            r"\(batch-norm statistics are float32\), got f64"):
        omnimoe_layer(random_input((9, 24)), lib.router_gate_x.weight, lib.router_gate_y.weight,
                      lib.up_embed.weight, lib.down_embed.weight, lib.gate_proj.weight,
                      lib.up_proj.weight, lib.down_proj.weight, num_experts_per_token=6,
                      running_stats=stats)


def test_module_in_float64_keeps_working():
    """module.double() also converts the statistics; the module hands the op float32 copies
    and writes the update back."""
    cfg = make_config()
    lib, ref = make_pair(cfg, torch.float64)
    x = random_input((9, 24), torch.float64)
    lib(x)
    ref(x)
    assert lib.router_norm_x.running_mean.dtype == torch.float64
    torch.testing.assert_close(lib.router_norm_x.running_mean, ref.router_norm_x.running_mean,
                               rtol=1e-5, atol=1e-6)


# ---- devices --------------------------------------------------------------------------------

@requires_cuda
def test_input_on_cuda_module_on_cpu():
    layer = OmniMoE(_config())
    with pytest.raises(omnimoe.Error, match=r"router_gate_x.weight must be on cuda:0 \(the "
                                            r"device of x\), got cpu"):
        layer(torch.randn(4, 8, device="cuda"))


@requires_cuda
def test_input_on_cpu_module_on_cuda():
    layer = OmniMoE(_config()).cuda()
    with pytest.raises(omnimoe.Error, match=r"must be on cpu \(the device of x\), got cuda:0"):
        layer(torch.randn(4, 8))


def test_binding_rejects_unsupported_dtype_directly():
    """The binding itself (no PyTorch): an int32 x names its dtype."""
    from omnimoe import _omnimoe as ext

    cfg = ext.layer_config(8, 4, 4, 2)
    x = torch.zeros(4, 8, dtype=torch.int32)
    w = torch.zeros(4, 8)
    e = torch.zeros(16, 8)
    y = torch.zeros(4, 8)
    b = torch.zeros(0, dtype=torch.uint8)
    dl = torch.utils.dlpack.to_dlpack
    with pytest.raises(omnimoe.Error, match=r"x must have dtype f32, f64, bf16 or f16, got i32"):
        ext.layer_forward(cfg, dl(x), dl(w), dl(w.clone()), dl(e), dl(e.clone()), None, None,
                          None, None, None, None, None, False, dl(y), dl(b), dl(b.clone()))


def test_binding_config_errors_name_the_field():
    from omnimoe import _omnimoe as ext

    with pytest.raises(omnimoe.Error, match=r"top_k"):
        ext.layer_config(8, 4, 4, 17)
    with pytest.raises(omnimoe.Error, match=r"act must be one of silu, gelu, relu"):
        ext.layer_config(8, 4, 4, 2, 0, "tanh")
