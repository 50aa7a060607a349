"""Optimizers built from presets: Adam and AdamW run torch's fused kernel and update exactly as the plain ones do."""

import pytest
import torch
from torch import nn

from perceiver_cli.models.optim import build_optimizer


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 5) -> None:
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("name, plain", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_is_fused_and_updates_like_the_plain_implementation(name, plain):
    ours, reference = tiny_model(), tiny_model()
    optimizer = build_optimizer(ours, name, lr=1e-2, weight_decay=0.1)
    assert all(group["fused"] for group in optimizer.param_groups)

    # The same parameter groups, stepped by the for-loop implementation: decay on the matrices only.
    groups = [
        {"params": [reference[0].weight, reference[2].weight], "weight_decay": 0.1},
        {"params": [reference[0].bias, reference[1].weight, reference[1].bias, reference[2].bias],
         "weight_decay": 0.0},
    ]
    train(ours, optimizer)
    train(reference, plain(groups, lr=1e-2, foreach=False, fused=False))
    for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_frozen_parameters_do_not_stop_the_fused_kernel():
    model = tiny_model()
    model[0].requires_grad_(False)
    optimizer = build_optimizer(model, "adamw")
    assert all(group["fused"] for group in optimizer.param_groups)
    before = model[0].weight.clone()
    train(model, optimizer, steps=1)
    assert torch.equal(model[0].weight, before)
