"""Optimizers built from presets: Adam and AdamW run torch's fused kernel and update exactly as the plain ones do."""

import copy

import pytest
import torch
import torch.nn.functional as F
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


# --- Muon for the hidden weight matrices, AdamW for the rest --------------------------------------------------------


def tiny_backends() -> dict[str, nn.Module]:
    import dataclasses

    from perceiver_cli.models.clm import CausalLanguageModel
    from perceiver_cli.models.mlm import MaskedLanguageModel
    from tiny_models import tiny_clm_config, tiny_mlm_config

    torch.manual_seed(0)
    mlm = tiny_mlm_config()
    untied = dataclasses.replace(mlm, decoder=dataclasses.replace(mlm.decoder, num_output_query_channels=16))
    return {
        "clm": CausalLanguageModel(tiny_clm_config()),
        "mlm": MaskedLanguageModel(mlm),
        "mlm-untied-output": MaskedLanguageModel(untied),
    }


@pytest.mark.parametrize("task", ["clm", "mlm", "mlm-untied-output"])
def test_muon_takes_the_hidden_linear_weights_and_adamw_the_rest(task):
    from perceiver_cli.models.optim import MUON_LR, MuonWithAdamW

    model = tiny_backends()[task]
    optimizer = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.01, betas=(0.9, 0.99))
    assert isinstance(optimizer, MuonWithAdamW)
    muon, decay, no_decay = optimizer.param_groups
    assert optimizer.muon.param_groups == [muon] and optimizer.adamw.param_groups == [decay, no_decay]

    # Every parameter in exactly one group.
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()) and len(set(grouped)) == len(grouped)

    names = {id(p): name for name, p in model.named_parameters()}
    in_muon, decayed, not_decayed = ({names[id(p)] for p in group["params"]} for group in (muon, decay, no_decay))
    hidden = {
        f"{path}.weight"
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and not path.endswith("output_linear")
    }
    assert in_muon == hidden and hidden  # every hidden Linear weight, and nothing else
    assert all(p.ndim == 2 for p in muon["params"])
    for name in in_muon:  # no embedding, norm, bias, learned input array or output layer
        assert not any(word in name for word in ("embedding", "norm", "bias", "latents", "output_"))
    assert not_decayed == {name for name in names.values() if name.endswith("bias") or "norm." in name}
    assert {"input_adapter.txt_embedding.weight", "input_adapter.pos_embedding.weight"} <= {
        name.removeprefix("encoder.") for name in decayed
    }
    if task == "mlm-untied-output":
        assert "output_linear.weight" in decayed and "output_linear.bias" in not_decayed

    assert (muon["lr"], muon["momentum"], muon["weight_decay"]) == (MUON_LR, 0.95, 0.01)
    assert (decay["lr"], decay["betas"], decay["weight_decay"]) == (1e-3, (0.9, 0.99), 0.01)
    assert no_decay["weight_decay"] == 0


def backend_loss(model: nn.Module) -> torch.Tensor:
    """Cross-entropy of predicting one fixed token everywhere (the CLM predicts from its last 12 positions)."""
    x = torch.randint(6, 262, (2, 32), generator=torch.Generator().manual_seed(1))
    logits = model(x, 20) if hasattr(model, "max_latents") else model(x)
    return F.cross_entropy(logits.flatten(0, 1), torch.full(logits.shape[:2], 7).flatten())


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_muon_steps_change_every_group_and_the_schedule_scales_both_lrs(task):
    from perceiver_cli.models.optim import build_scheduler, lr_factor

    model = tiny_backends()[task]
    optimizer = build_optimizer(model, "muon", lr=1e-3, muon_lr=0.05, muon_momentum=0.9, fused=False)
    scheduler = build_scheduler(optimizer, "cosine", warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    before = [[p.detach().clone() for p in group["params"]] for group in optimizer.param_groups]
    for step in range(5):
        expected = lr_factor(step, "cosine", 2, 6, 0.1)
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx(
            [0.05 * expected, 1e-3 * expected, 1e-3 * expected]
        )
        optimizer.zero_grad(set_to_none=True)
        backend_loss(model).backward()
        optimizer.step()
        scheduler.step()
    for group, old in zip(optimizer.param_groups, before, strict=True):
        changed = [not torch.equal(p, q) for p, q in zip(group["params"], old, strict=True)]
        assert sum(changed) >= len(changed) // 2 and any(changed)  # (a latent's or query's grad can be zero)
    assert all("momentum_buffer" in optimizer.state[p] for p in optimizer.param_groups[0]["params"])
    assert all("exp_avg" in optimizer.state[p] for p in optimizer.param_groups[1]["params"])


def test_muon_state_round_trips_through_state_dict():
    """What resuming does: a loaded optimizer goes on exactly as the saved one would have."""
    models = [tiny_backends()["clm"].eval() for _ in range(2)]  # eval: no dropout draws
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [build_optimizer(m, "muon", lr=1e-3, weight_decay=0.01) for m in models]
    for _ in range(2):
        optimizers[0].zero_grad()
        backend_loss(models[0]).backward()
        optimizers[0].step()
    models[1].load_state_dict(models[0].state_dict())
    optimizers[1].load_state_dict(copy.deepcopy(optimizers[0].state_dict()))  # as through a checkpoint file
    assert optimizers[1].muon.state is optimizers[1].state and optimizers[1].adamw.param_groups[0]["params"]
    for model, optimizer in zip(models, optimizers, strict=True):
        optimizer.zero_grad()
        backend_loss(model).backward()
        optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_muon_settings_belong_to_muon():
    with pytest.raises(ValueError, match="settings of the muon optimizer"):
        build_optimizer(tiny_model(), "adamw", muon_lr=0.02)


def test_perceiver_train_with_muon(capsys, tmp_path):
    import json

    from test_train import checkpoint_step, train

    code, _, err = train(capsys, "clm", tmp_path, "optimizer.name=muon", "optimizer.muon_lr=0.01")
    assert code in (0, None), err
    run = tmp_path / "clm-small" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["val_loss"] > 0
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]
    assert state["param_groups"][0]["momentum"] == 0.95 and "betas" in state["param_groups"][1]
    # Resuming restores both optimizers' state and goes on.
    code, out, err = train(capsys, "clm", tmp_path, "optimizer.name=muon", "optimizer.muon_lr=0.01",
                           "trainer.max_steps=6", options=("--resume", "auto"))
    assert code in (0, None) and "resuming from" in out, err
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 6


def test_warmup_stable_decay_holds_the_rate_then_decays_linearly_over_the_last_steps():
    from perceiver_cli.models.optim import lr_factor

    factors = [lr_factor(step, "wsd", 2, 10, 0.1, decay_fraction=0.4) for step in range(11)]
    assert factors[:2] == [0.5, 1.0]  # warmup
    assert factors[2:7] == [1.0] * 5  # stable until the last 4 steps
    assert factors[7:] == pytest.approx([0.1 + 0.9 * left / 4 for left in (3, 2, 1, 0)])  # linear down to the floor
