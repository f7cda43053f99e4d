"""torch.autograd.gradcheck of the library op on the CPU in float64.

The expert and MLP weights enter y through float64 arithmetic only, so they are checked at
gradcheck's default step with tighter tolerances. The router (logits, log-probabilities, scores, gates)
is float32 by contract even for float64 storage, so the inputs that reach it (x and the router
weights) are checked with a step large enough to rise above float32 rounding (1e-3: measured
difference-quotient errors up to 3e-5 on Jacobian entries up to 0.2) and atol 1e-4, rtol 1e-3. A step must
not change which experts are selected (the selection has no gradient and a flip is a jump), so
the inputs are drawn until every token's K-th and (K+1)-th scores are well apart.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_config, make_pair, random_input

TOKENS = 9


def _inputs(cfg, training, seed):
    """Module and x whose selection is stable under a step of 1e-3 in any input."""
    for attempt in range(50):
        lib, ref = make_pair(cfg, torch.float64, seed + 100 * attempt)
        ref.train(training)
        x = random_input((TOKENS, cfg.hidden_size), torch.float64, seed + 100 * attempt + 1)
        k = cfg.num_experts_per_token
        if k == cfg.num_experts:
            return lib, x
        with torch.no_grad():
            scores = _all_scores(ref, x, training)
            top = scores.sort(dim=-1, descending=True).values
            margin = (top[:, k - 1] - top[:, k]).min().item()
        if margin > 0.05:
            return lib, x
    pytest.fail("no input with a stable selection found in 50 draws")


def _all_scores(ref, x, training):
    import torch.nn.functional as F
    from omnimoe.reference import _batch_norm

    def logp(gate, norm):
        logits = x @ gate.weight.t()
        if ref.config.router_norm == "batch":
            saved = (norm.running_mean.clone(), norm.running_var.clone(),
                     norm.num_batches_tracked.clone())
            logits = _batch_norm(norm, logits, training)
            norm.running_mean.copy_(saved[0])
            norm.running_var.copy_(saved[1])
            norm.num_batches_tracked.copy_(saved[2])
        return F.log_softmax(logits, dim=-1)

    lr = logp(ref.router_gate_x, ref.router_norm_x)
    lc = logp(ref.router_gate_y, ref.router_norm_y)
    return (lr[:, :, None] + lc[:, None, :]).reshape(x.shape[0], -1)


def _layer_fn(lib, cfg, training):
    stats = [s.detach().float() for s in (lib.router_norm_x.running_mean,
                                          lib.router_norm_x.running_var,
                                          lib.router_norm_y.running_mean,
                                          lib.router_norm_y.running_var)]
    if cfg.router_norm == "none":
        stats = [None] * 4

    def fn(x, row, col, up, down, *mlp):
        mlp = list(mlp) if mlp else [None, None, None]
        # fresh copies: training updates the statistics it is given
        s = [None if t is None else t.clone() for t in stats]
        y, *_ = torch.ops.omnimoe.layer_forward(
            x, row, col, up, down, *mlp, *s, cfg.num_experts_per_token, cfg.activation,
            cfg.gating, cfg.router_norm, 1e-5, 0.1, training)
        return y

    return fn


def _weights(lib):
    ws = [lib.router_gate_x.weight, lib.router_gate_y.weight, lib.up_embed.weight,
          lib.down_embed.weight]
    if lib.gate_proj is not None:
        ws += [lib.gate_proj.weight, lib.up_proj.weight, lib.down_proj.weight]
    return [w.detach().clone() for w in ws]


CASES = {
    "d6_I5_Nr3_Nc4_K3_softmax_batch": {"d": 6, "inter": 5, "grid": (3, 4), "k": 3},
    "d6_I0_Nr3_Nc4_K2_joint_gelu": {"d": 6, "inter": 0, "grid": (3, 4), "k": 2,
                                    "gating": "joint", "act": "gelu"},
    "d5_I4_Nr2_Nc3_K6_KeqN_none": {"d": 5, "inter": 4, "grid": (2, 3), "k": 6, "norm": "none"},
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_f64_expert_and_mlp_weights(case, training):
    """Everything downstream of the router: float64 arithmetic, so tighter than gradcheck's
    defaults (atol 1e-7 and rtol 1e-5 instead of 1e-5 and 1e-3)."""
    cfg = make_config(**CASES[case])
    lib, x = _inputs(cfg, training, 1)
    fn = _layer_fn(lib, cfg, training)
    weights = _weights(lib)
    row, col = weights[0], weights[1]
    rest = [w.requires_grad_(True) for w in weights[2:]]

    def downstream(*ws):
        return fn(x, row, col, *ws)

    assert torch.autograd.gradcheck(downstream, rest, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_f64_all_inputs_through_fp32_router(case, training):
    cfg = make_config(**CASES[case])
    lib, x = _inputs(cfg, training, 2)
    fn = _layer_fn(lib, cfg, training)
    inputs = [x.detach().clone().requires_grad_(True)]
    inputs += [w.requires_grad_(True) for w in _weights(lib)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-3, atol=1e-4, rtol=1e-3)


def test_gradcheck_f64_reference_itself():
    """The reference, all float64, at gradcheck's defaults: the oracle's gradients are right."""
    cfg = make_config(d=6, inter=5, grid=(3, 4), k=3)
    lib, x = _inputs(cfg, True, 3)
    from omnimoe.torch import OmniMoEReference

    ref = OmniMoEReference(cfg).double()
    ref.load_state_dict(lib.state_dict())
    params = dict(ref.named_parameters())
    names = list(params)

    def fn(x, *ws):
        out = torch.func.functional_call(ref, dict(zip(names, ws)), (x,))
        return out

    inputs = [x.detach().clone().requires_grad_(True)]
    inputs += [p.detach().clone().requires_grad_(True) for p in params.values()]
    assert torch.autograd.gradcheck(fn, inputs)
