"""PyTorch Lightning wrappers of the backend language models: losses, logging, optimizers.

Each wrapper's constructor takes the model config's fields as JSON-able values and saves them as hyperparameters,
so a checkpoint alone rebuilds its model (and loads with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from perceiver_cli.models.clm.model import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_cli.models.mlm.model import MaskedLanguageModel, MaskedLanguageModelConfig
from perceiver_cli.models.optim import build_optimizer, build_scheduler
from perceiver_cli.models.saved_model import CHECKPOINT_KEY, checkpoint_metadata

Batch = dict[str, torch.Tensor]


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN or infinite; raised before the optimizer step, so no checkpoint
    ever holds weights updated from them."""

    def __init__(self, what: str, step: int):
        super().__init__(f"the {what} became NaN or infinite at step {step}")
        self.what = what
        self.step = step


class LitLanguageModel(pl.LightningModule):
    """What both wrappers share: training and validation steps around `loss`, optimizer and schedule."""

    model: torch.nn.Module

    def __init__(self, optimizer: dict[str, Any] | None = None, scheduler: dict[str, Any] | None = None):
        super().__init__()
        self.optimizer_config = optimizer or {}
        self.scheduler_config = scheduler or {}
        # Set by whoever builds the run (the train command): written into every checkpoint, see on_save_checkpoint.
        self.tokenizer_spec = "utf8"
        self.run_config: dict[str, Any] | None = None

    @property
    def backend_model(self) -> torch.nn.Module:
        return self.model

    def compile_model(self) -> None:
        """Train through `torch.compile(model)`. Kept outside the module tree, so checkpoints keep plain names."""
        self.__dict__["_compiled"] = torch.compile(self.model)

    def run_model(self, *args, **kwargs) -> torch.Tensor:
        return self.__dict__.get("_compiled", self.model)(*args, **kwargs)

    task: str

    def loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What the one checkpoint loader needs to rebuild the backend model without this class.
        checkpoint[CHECKPOINT_KEY] = checkpoint_metadata(
            self.task, self.model.config, self.run_config, self.tokenizer_spec
        )
        # Dropout and cross-attention dropout draw from torch's global generator: a resumed run continues its
        # sequence of draws, as one that never stopped would.
        checkpoint["rng_states"] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states", {})
        if "cpu" in states:
            torch.set_rng_state(states["cpu"])
        if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        # The step's loss is the mean over ranks (what the gradients average): it is what gets logged, and a NaN on
        # any rank stops all of them at once; a rank stopping alone would leave the others waiting forever.
        step_loss = self.trainer.strategy.reduce(loss.detach().clone(), reduce_op="mean")  # reduces in place
        if not torch.isfinite(step_loss):
            raise NonFiniteLossError("training loss", self.global_step)
        self.log("train_loss", step_loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def token_mean_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (logits (T, V), labels (T,), -100 where none) averaged over the predicted tokens of the
        whole step: with several ranks, a rank's sum is divided by the ranks' mean count of tokens, so that the mean
        over ranks (of the loss and of DDP's gradients) is one process's loss over the whole batch. A rank's own mean
        would weigh each token by how few its rank has (masked LM batches differ in their number of masks)."""
        total = F.cross_entropy(logits, labels, reduction="sum")
        count = (labels != -100).sum().to(total.dtype)
        if self._trainer is not None and self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="mean")  # every rank computes a loss, every step
        return total / count

    def on_before_optimizer_step(self, optimizer) -> None:
        # A finite loss can still overflow in the backward pass; updating with such gradients would poison the
        # weights that the next checkpoint saves.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.norm() for g in grads]).sum()):
            raise NonFiniteLossError("gradient", self.global_step)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss = self.loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        # Under mixed precision Lightning unscales gradients itself before it clips them, and refuses to for an
        # optimizer that unscales in its own step, as the fused kernel does: clipped mixed precision runs without it.
        trainer = self._trainer
        clipped_mixed = trainer is not None and bool(trainer.gradient_clip_val) and "mixed" in str(trainer.precision)
        optimizer = build_optimizer(self.model, **self.optimizer_config, fused=not clipped_mixed)
        total_steps = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        if total_steps is not None and not 0 < total_steps < float("inf"):
            total_steps = None  # no step budget known (e.g. max_time only): the cosine schedule needs one
        scheduler = build_scheduler(optimizer, total_steps=total_steps, **self.scheduler_config)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LitMaskedLanguageModel(LitLanguageModel):
    task = "mlm"

    def __init__(
        self,
        encoder: dict[str, Any],
        decoder: dict[str, Any],
        num_latents: int,
        num_latent_channels: int,
        activation_checkpointing: bool = False,
        activation_offloading: bool = False,
        routing_init: str = "random",
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ):
        super().__init__(optimizer, scheduler)
        self.save_hyperparameters()
        config = MaskedLanguageModelConfig.from_dict(
            dict(
                encoder=encoder,
                decoder=decoder,
                num_latents=num_latents,
                num_latent_channels=num_latent_channels,
                activation_checkpointing=activation_checkpointing,
                activation_offloading=activation_offloading,
                routing_init=routing_init,
            )
        )
        self.model = MaskedLanguageModel(config)

    @classmethod
    def create(cls, config: MaskedLanguageModelConfig, **kwargs: Any) -> "LitMaskedLanguageModel":
        return cls(**config.to_dict(), **kwargs)

    def loss(self, batch: Batch) -> torch.Tensor:
        """Cross-entropy on the masked positions only; the decoder computes no other position."""
        labels = batch["labels"]  # (B, M), -100 where no prediction is wanted
        selected = labels != -100
        num_selected = int(selected.sum(dim=1).max())
        # Selected positions first, per example; the tail of shorter rows points at unselected positions whose
        # label is -100, so they drop out of the loss.
        positions = torch.argsort((~selected).to(torch.uint8), dim=1, stable=True)[:, :num_selected]  # (B, S)
        logits = self.run_model(batch["input_ids"], batch.get("pad_mask"), output_positions=positions)  # (B, S, V)
        return self.token_mean_loss(logits.flatten(0, 1), labels.gather(1, positions).flatten())


class LitCausalLanguageModel(LitLanguageModel):
    task = "clm"

    def __init__(self, optimizer: dict[str, Any] | None = None, scheduler: dict[str, Any] | None = None, **config):
        super().__init__(optimizer, scheduler)
        self.save_hyperparameters()
        self.model = CausalLanguageModel(CausalLanguageModelConfig.from_dict(config))

    @classmethod
    def create(cls, config: CausalLanguageModelConfig, **kwargs: Any) -> "LitCausalLanguageModel":
        return cls(**config.to_dict(), **kwargs)

    def loss(self, batch: Batch) -> torch.Tensor:
        """Cross-entropy on the latent positions: the last max_latents positions of each (left-padded) sequence."""
        x, labels = batch["input_ids"], batch["labels"]  # (B, N) each; labels are inputs shifted left by one
        pad_mask = batch.get("pad_mask")
        if pad_mask is not None and not pad_mask.any():
            pad_mask = None  # no padding: lets attention use its fused causal kernels
        prefix_len = max(0, x.shape[1] - self.model.max_latents)
        logits = self.run_model(x, prefix_len, pad_mask=pad_mask)  # (B, L, V)
        return self.token_mean_loss(logits.flatten(0, 1), labels[:, prefix_len:].flatten())
