"""A two-layer toy model with the module learns a synthetic regression task on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toy import ToyModel, batch

# Predicting the mean scores about 2.0 (the targets' variance); the model reaches about 0.04 in
# 300 steps.
LOSS_BOUND = 0.1


def train(model, steps, device="cpu", seed=1):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = batch(g, 256, device)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def evaluate(model, device="cpu"):
    x, y = batch(torch.Generator().manual_seed(99), 1024, device)
    model.eval()
    with torch.no_grad():
        loss = F.mse_loss(model(x), y).item()
    model.train()
    return loss, y.var().item()


def test_toy_model_learns_on_cpu():
    torch.manual_seed(0)
    model = ToyModel()
    before, variance = evaluate(model)
    experts_before = model.moes[0].up_embed.weight.detach().clone()
    train(model, 300)
    after, _ = evaluate(model)
    assert variance > 1.5, "the task is not the one the bound was set for"
    assert after < LOSS_BOUND, f"loss {after:.4f} after 300 steps (from {before:.4f})"
    assert after < 0.1 * before
    moved = (model.moes[0].up_embed.weight - experts_before).abs().amax(dim=1) > 0
    assert moved.float().mean() > 0.5, "most atomic experts were never updated"
