"""The Lightning strategy for `[trainer] strategy`: "auto" and "ddp" are Lightning's own; "fsdp" is Lightning's
FSDPStrategy set up for our models.

FSDP shards each attention layer (cross- or self-attention with its MLP, in both model kinds) as one unit, so a
device holds the full weights of one layer at a time; `[trainer.fsdp] activation_checkpointing` recomputes those
layers' activations in the backward pass instead of keeping them. Checkpoints are consolidated into one file
("full" state dict, written by rank 0) that resumes on any number of processes and that
`perceiver_cli.checkpoints.load_model` reads like any other.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import FSDPStrategy
from torch import nn

from perceiver_cli.errors import UserError
from perceiver_cli.models.layers import CrossAttentionLayer, SelfAttentionLayer
from perceiver_cli.models.lightning import NonFiniteLossError

if TYPE_CHECKING:
    from perceiver_cli.config import RunConfig

SHARDED_LAYERS: frozenset[type[nn.Module]] = frozenset({CrossAttentionLayer, SelfAttentionLayer})


def build_strategy(cfg: RunConfig):
    """The Trainer's `strategy` argument: Lightning's name for auto and ddp, a configured FSDPStrategy for fsdp."""
    t = cfg.trainer
    if t.strategy != "fsdp":
        return t.strategy
    if t.accelerator == "auto" and not torch.cuda.is_available():
        raise UserError('strategy "fsdp" needs CUDA GPUs and this machine has none', hint='use "ddp" on the CPU')
    from perceiver_cli.config import FSDPSection

    fsdp = t.fsdp or FSDPSection()
    options = {}
    if fsdp.sharding == "hybrid_shard":
        # Shard within a node, replicate across nodes (Lightning turns the pair into a device mesh).
        options["device_mesh"] = (t.num_nodes, t.devices)
    return FSDPStrategy(
        auto_wrap_policy=set(SHARDED_LAYERS),
        activation_checkpointing_policy=set(SHARDED_LAYERS) if fsdp.activation_checkpointing else None,
        sharding_strategy=fsdp.sharding.upper(),
        state_dict_type="full",
        **options,
    )


def gradient_clip_val(cfg: RunConfig) -> float | None:
    """What the Trainer clips: nothing under FSDP, where ShardedGradientClipping does (Lightning cannot)."""
    return None if cfg.trainer.strategy == "fsdp" else cfg.trainer.gradient_clip_val


def strategy_callbacks(cfg: RunConfig) -> list[pl.Callback]:
    return [ShardedGradientClipping(cfg.trainer.gradient_clip_val)] if cfg.trainer.strategy == "fsdp" else []


class ShardedGradientClipping(pl.Callback):
    """Gradient clipping by norm under FSDP, which Lightning does not offer: each rank holds a shard of the
    gradients, so only the root FSDP module can compute their norm, over all ranks. That one global norm also tells
    every rank at once that a gradient became NaN or infinite; a rank stopping on its own shard would leave the
    others waiting forever in the next collective. Without a clip value the norm is still computed, for the check."""

    def __init__(self, max_norm: float | None):
        self.max_norm = max_norm

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        norm = trainer.strategy.model.clip_grad_norm_(self.max_norm or math.inf)
        if not torch.isfinite(norm):
            raise NonFiniteLossError("gradient", trainer.global_step)
