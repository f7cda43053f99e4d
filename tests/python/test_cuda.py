"""CUDA: values and gradients against the CPU path, CUDA-graph capture of a training step, no
host synchronisation, autocast, torch.compile and the toy model. Skipped, with the reason, on a
machine without a CUDA device or without the library's CUDA backend."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from omnimoe.torch import OmniMoE

from conftest import assert_close, make_config, randomize, random_input, requires_cuda

pytestmark = requires_cuda

# The paths the experts op picks on CUDA depend on tokens per expert; both sizes run here.
SIZES = {
    "T257_d64_I48_Nr9_Nc11_K7": dict(tokens=257, d=64, inter=48, grid=(9, 11), k=7),
    "T300_d96_I0_Nr4_Nc5_K20_KeqN": dict(tokens=300, d=96, inter=0, grid=(4, 5), k=20),
    "T1024_d128_I64_Nr32_Nc32_K64": dict(tokens=1024, d=128, inter=64, grid=(32, 32), k=64),
}


def _round(module, dtype):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).float())


def _twins(cfg, dtype, seed):
    """A CPU float32 module and a CUDA module in `dtype` holding the same values."""
    cpu = OmniMoE(cfg)
    randomize(cpu, seed)
    _round(cpu, dtype)
    gpu = OmniMoE(cfg, device="cuda", dtype=dtype)
    gpu.load_state_dict(cpu.state_dict())
    assert gpu.router_norm_x.running_mean.dtype == torch.float32
    return cpu, gpu


def _compare(size, dtype, training, gating="softmax", act="silu", seed=61):
    s = SIZES[size]
    cfg = make_config(d=s["d"], inter=s["inter"], grid=s["grid"], k=s["k"], gating=gating,
                      act=act)
    cpu, gpu = _twins(cfg, dtype, seed)
    cpu.train(training)
    gpu.train(training)
    x = random_input((s["tokens"], s["d"]), dtype, seed + 1).float()
    dy = random_input((s["tokens"], s["d"]), dtype, seed + 2).float()
    x_cpu = x.clone().requires_grad_(True)
    x_gpu = x.to("cuda", dtype).requires_grad_(True)
    y_cpu, y_gpu = cpu(x_cpu), gpu(x_gpu)
    assert y_gpu.dtype == dtype and y_gpu.is_cuda
    terms = s["d"] + s["k"] + s["inter"]
    assert_close(y_gpu, y_cpu, dtype, terms, f"{size} y")
    g_cpu = torch.autograd.grad(y_cpu, [x_cpu, *cpu.parameters()], dy)
    g_gpu = torch.autograd.grad(y_gpu, [x_gpu, *gpu.parameters()], dy.to("cuda", dtype))
    names = ["x"] + [n for n, _ in cpu.named_parameters()]
    for name, a, b in zip(names, g_gpu, g_cpu):
        assert_close(a, b, dtype, terms * s["k"], f"{size} grad of {name}")
    for norm in ("router_norm_x", "router_norm_y"):
        for stat in ("running_mean", "running_var"):
            a = getattr(getattr(gpu, norm), stat)
            b = getattr(getattr(cpu, norm), stat)
            assert_close(a, b, torch.float32, s["tokens"] * s["d"], f"{norm}.{stat}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("size", list(SIZES))
def test_cuda_bf16_matches_cpu_f32(size, training):
    _compare(size, torch.bfloat16, training)


@pytest.mark.parametrize("size", list(SIZES))
def test_cuda_f32_matches_cpu_f32(size):
    _compare(size, torch.float32, True)


def test_cuda_bf16_joint_gelu_matches_cpu_f32():
    _compare("T257_d64_I48_Nr9_Nc11_K7", torch.bfloat16, True, gating="joint", act="gelu")


def test_cuda_autocast_bf16_matches_cpu_f32():
    cfg = make_config(d=64, inter=48, grid=(9, 11), k=7)
    cpu = OmniMoE(cfg)
    randomize(cpu, 71)
    gpu = copy.deepcopy(cpu).cuda()
    x = random_input((4, 33, 64), torch.bfloat16, 72).float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = gpu(x.cuda())
    assert y.dtype == torch.bfloat16
    _round(cpu, torch.bfloat16)
    assert_close(y, cpu(x), torch.bfloat16, 64 + 7 + 48, "y under autocast")
    y.float().square().mean().backward()
    for name, p in gpu.named_parameters():
        assert p.grad.dtype == torch.float32 and p.grad.abs().max() > 0, name


def _toy(device="cuda"):
    from toy import ToyModel

    torch.manual_seed(0)
    return ToyModel().to(device)


def test_cuda_no_host_sync_in_forward_backward():
    model = _toy()
    x = torch.randn(256, 8, device="cuda")
    model(x).square().mean().backward()  # warm-up: lazy initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for training in (True, False):
            model.train(training)
            model.zero_grad(set_to_none=False)
            model(x).square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_cuda_graph_captures_a_training_step():
    """Forward, backward and optimizer step captured once, replayed on new data; the replays
    give the same parameters and statistics as the same steps run eagerly, and the loss falls
    (Adam at 3e-3 takes it from about 1.6 to about 1.0 in 30 steps)."""
    from toy import batch

    model = _toy()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, capturable=True)
    g = torch.Generator().manual_seed(5)
    static_x, static_y = (t.cuda() for t in batch(g, 256))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            F.mse_loss(model(static_x), static_y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)

    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=3e-3, capturable=True)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = F.mse_loss(model(static_x), static_y)
        static_loss.backward()
        opt.step()

    steps = 30
    losses = []
    for _ in range(steps):
        x, y = (t.cuda() for t in batch(g, 256))
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        losses.append(static_loss.item())
        twin_opt.zero_grad(set_to_none=True)
        F.mse_loss(twin(x), y).backward()
        twin_opt.step()
    torch.cuda.synchronize()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(p, q, torch.float32, 10000, f"{name} after {steps} replays")
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):
        if b.dtype == torch.long:
            assert torch.equal(b, c), name
        else:
            assert_close(b, c, torch.float32, 10000, f"{name} after {steps} replays")
    assert int(model.moes[0].router_norm_x.num_batches_tracked) == 3 + steps
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"loss did not fall over the replays: {losses}"


def test_cuda_toy_model_learns():
    from test_training import LOSS_BOUND, evaluate, train

    model = _toy()
    before, _ = evaluate(model, "cuda")
    train(model, 300, "cuda")
    after, _ = evaluate(model, "cuda")
    assert after < LOSS_BOUND, f"loss {after:.4f} after 300 steps (from {before:.4f})"


def test_cuda_compile_fullgraph_matches_eager():
    cfg = make_config(d=64, inter=48, grid=(9, 11), k=7)
    eager = OmniMoE(cfg, device="cuda")
    randomize(eager, 81)
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, fullgraph=True)
    x = random_input((2, 65, 64), torch.float32, 82, "cuda")
    y, y_eager = compiled(x), eager(x)
    assert_close(y, y_eager, torch.float32, 200, "y")
    y.square().sum().backward()
    y_eager.square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), module.parameters()):
        assert_close(q.grad, p.grad, torch.float32, 20000, f"grad of {name}")


def test_cuda_readme_example_runs():
    """The README's PyTorch example, as written: a 64 x 64 grid, K = 32, bf16 autocast."""
    import pathlib
    import re

    readme = pathlib.Path(__file__).resolve().parents[2] / "README.md"
    section = readme.read_text().split("## PyTorch", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, str(readme), "exec"), scope)
    torch.cuda.synchronize()
    y, layer = scope["y"], scope["layer"]
    assert y.shape == (4, 128, 256) and y.dtype == torch.bfloat16 and y.is_cuda
    assert torch.isfinite(y.float()).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, f"{name}: all-zero gradient"
