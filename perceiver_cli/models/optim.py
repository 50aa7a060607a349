"""Optimizers and learning-rate schedules, chosen by name from fixed lists (presets never name Python classes)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

OPTIMIZERS = ("adam", "adamw", "lamb", "muon")
# Muon's own settings where the preset leaves them out: the published recipe's (github.com/KellerJordan/Muon, README:
# lr 0.02 for the hidden weights, momentum 0.95 with Nesterov); torch.optim.Muon's defaults are lr 1e-3, momentum 0.95.
MUON_LR = 0.02
MUON_MOMENTUM = 0.95
# Attribute names of layers that produce the logits without being tied to the token embedding (MaskedLanguageModel's
# `output_linear` when its queries are narrower than the embedding; transformers' `lm_head`).
OUTPUT_LAYERS = ("output_linear", "lm_head")
SCHEDULERS = ("constant", "cosine", "wsd")


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, https://arxiv.org/abs/1904.00962): Adam whose per-tensor step is rescaled by the trust
    ratio ||w|| / ||update||, so large batches train stably. Weight decay is part of the update, as in the paper."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        if lr <= 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ValueError(f"invalid Lamb arguments: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"] > 0:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.sub_(update * (group["lr"] * trust))
        return loss


def parameter_roles(model: nn.Module) -> list[tuple[nn.Parameter, str]]:
    """Every trainable parameter once, with its role, the one rule the optimizers' groups follow:
    - "vector": LayerNorm parameters and biases;
    - "embedding": embedding tables (token and position, and so the tied output layer), learned input arrays
      registered as bare parameters (Perceiver IO's latents and output queries), and the weights of any other module
      that is not an nn.Linear;
    - "output": the weight of an untied output layer (`OUTPUT_LAYERS`);
    - "hidden": the weight of every other nn.Linear: attention projections and MLP layers.
    Told apart by module and name, not by shape: under FSDP every parameter is a flat (1-d) shard when the optimizer
    is built. A weight shared by an embedding and a Linear (tied) is an embedding."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    roles, seen = [], set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, nn.LayerNorm) or name.endswith("bias"):
                role = "vector"
            elif id(p) in embeddings or not isinstance(module, nn.Linear):
                role = "embedding"
            elif module_name.rpartition(".")[2] in OUTPUT_LAYERS:
                role = "output"
            else:
                role = "hidden"
            roles.append((p, role))
    return roles


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never biases or LayerNorm parameters (vectors), as is standard."""
    roles = parameter_roles(model)
    return [
        {"params": [p for p, role in roles if role != "vector"], "weight_decay": weight_decay},
        {"params": [p for p, role in roles if role == "vector"], "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: Iterable[float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool = True,
    muon_lr: float | None = None,
    muon_momentum: float | None = None,
) -> torch.optim.Optimizer:
    """The optimizer `name`; Adam and AdamW run torch's fused kernel where it can (`fused`) and the parameters allow.
    "muon": Muon (`muon_lr`, `muon_momentum`; default `MUON_LR`, `MUON_MOMENTUM`) for the hidden weight matrices,
    AdamW (`lr`, `betas`, `eps`) for the rest (see `MuonWithAdamW`); `weight_decay` applies to both, as for AdamW."""
    betas = tuple(betas)
    if name == "muon":
        return MuonWithAdamW(
            model, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused and fused_supported(model),
            muon_lr=MUON_LR if muon_lr is None else muon_lr,
            muon_momentum=MUON_MOMENTUM if muon_momentum is None else muon_momentum,
        )
    if muon_lr is not None or muon_momentum is not None:
        raise ValueError(f"muon_lr and muon_momentum are settings of the muon optimizer, not of {name!r}")
    groups = parameter_groups(model, weight_decay)
    if name in ("adam", "adamw"):
        adam = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return adam(groups, lr=lr, betas=betas, eps=eps, fused=fused and fused_supported(model))
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon (torch.optim.Muon: momentum, then the update orthogonalised by Newton-Schulz iterations) for the hidden
    weight matrices, AdamW for embeddings, the output layer, norms and biases (`parameter_roles`), as one optimizer:
    Lightning steps, clips, checkpoints and schedules one. Its `param_groups` are the Muon group followed by AdamW's
    two (with and without weight decay), the very dicts the two inner optimizers read, so a scheduler that scales
    every group's lr scales both optimizers; both keep their state in this optimizer's `state`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        eps: float,
        muon_lr: float,
        muon_momentum: float,
        fused: bool = False,
    ):
        roles = parameter_roles(model)
        hidden = [p for p, role in roles if role == "hidden"]
        flat = [tuple(p.shape) for p in hidden if p.ndim != 2]
        if flat:
            raise ValueError(f"Muon needs 2-d weight matrices, got parameters of shapes {flat[:3]} (sharded by FSDP?)")
        others = [(p, role) for p, role in roles if role != "hidden"]
        adamw_groups = [
            {"params": [p for p, role in others if role != "vector"], "weight_decay": weight_decay},
            {"params": [p for p, role in others if role == "vector"], "weight_decay": 0.0},
        ]
        self.muon = torch.optim.Muon(
            [{"params": hidden}], lr=muon_lr, momentum=muon_momentum, weight_decay=weight_decay
        )
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, fused=fused)
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], {})
        self._share()

    def _share(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state  # disjoint parameters: one state dict serves both

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)  # replaces `param_groups` and `state` with new objects
        self._share()


def fused_supported(model: nn.Module) -> bool:
    """Whether torch's fused Adam kernel can update these parameters: one kernel per step for all tensors instead
    of about ten small operations per tensor (what transformers' Trainer uses by default too)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def lr_factor(step: int, name: str, warmup_steps: int, total_steps: int | None, min_lr_ratio: float,
              decay_fraction: float = 0.2) -> float:
    """Learning-rate multiplier at `step`: linear warmup, then constant, cosine decay to `min_lr_ratio`, or "wsd"
    (warmup-stable-decay, as the fastest GPT training recipes: constant, then a linear decay to `min_lr_ratio` over
    the last `decay_fraction` of the steps)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant" or not total_steps:
        return 1.0
    if name == "wsd":
        decay_steps = max(1, round(decay_fraction * total_steps))
        left = min(1.0, (total_steps - step) / decay_steps)  # 1 until the decay starts, 0 at the last step
        return min_lr_ratio + (1 - min_lr_ratio) * max(0.0, left)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
    decay_fraction: float = 0.2,
) -> torch.optim.lr_scheduler.LambdaLR:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, name, warmup_steps, total_steps, min_lr_ratio, decay_fraction)
    )
