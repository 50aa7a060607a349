"""PyTorch Lightning wrappers of the backend language models: losses, logging, optimizers.

Each wrapper's constructor takes the model config's fields as typed parameters, as the seed's wrappers do, so that
the Lightning CLI (examples/mlm.py, examples/clm.py) shows and binds them as `--model.*` options: the causal LM's
flat fields, the masked LM's `encoder: TextEncoderConfig` and `decoder: TextDecoderConfig` groups and its own
fields. `params` names the weights to start from. The hyperparameters saved are plain values (configs as dicts), so
a checkpoint alone rebuilds its model and loads with `torch.load(weights_only=True)`; checkpoints of earlier
versions, whose hyperparameters were `optimizer`, `scheduler` and the config's fields, load unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from perceiver_cli.data.masking import IGNORE_INDEX
from perceiver_cli.errors import UserError
from perceiver_cli.models.clm.model import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_cli.models.clm.windows import short_pieces
from perceiver_cli.models.mlm.model import (
    MaskedLanguageModel,
    MaskedLanguageModelConfig,
    TextDecoderConfig,
    TextEncoderConfig,
)
from perceiver_cli.models.mlm.positions import masked_positions
from perceiver_cli.models.optim import build_optimizer, build_scheduler
from perceiver_cli.models.loading import load_model_path
from perceiver_cli.models.saved_model import CHECKPOINT_KEY, TASK_NAMES, LoadedModel, checkpoint_metadata

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

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args: Any, **kwargs: Any):
        # The checkpoint's own weights replace whatever `params` named when it was trained (as in the seed): loading
        # those again would only cost time, or fail where they are no longer at hand.
        kwargs.setdefault("params", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def start_from(self, source: str) -> None:
        """Load the weights of `source` (see `load_params`) into the backend model, which must have the same
        architecture."""
        loaded = load_params(source, self.task)
        ours, theirs = self.model.state_dict(), loaded.model.state_dict()
        mismatched = [name for name, t in theirs.items() if name not in ours or ours[name].shape != t.shape]
        if mismatched or theirs.keys() != ours.keys():
            raise UserError(
                f"model.params {source}: its architecture differs from this model's ({len(mismatched)} tensors differ "
                f"in name or shape, e.g. {', '.join(mismatched[:3]) or 'missing keys'})",
                hint=f"set the --model.* options to the source model's config: {loaded.config.to_dict()}",
            )
        self.model.load_state_dict(theirs)
        if loaded.tokenizer:
            self.tokenizer_spec = loaded.tokenizer

    def setup(self, stage: str) -> None:
        # Under the Lightning CLI nobody sets tokenizer_spec and run_config (the train command does): the data
        # module knows them. It must also prepare data for this model's task, padded on the side the model needs.
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None:
            return
        task = getattr(datamodule, "task", self.task)
        if task != self.task:
            raise UserError(
                f"the data module prepares {task} data, but this is a {self.task} model: set --data.task={self.task}"
            )
        tokenizer = getattr(datamodule, "tokenizer", None)
        side = "left" if self.task == "clm" else "right"
        if tokenizer is not None and tokenizer.padding_side != side:
            raise UserError(
                f"the {self.task} model needs data padded on the {side}, not the {tokenizer.padding_side}: "
                f"set --data.padding_side={side} or leave it unset"
            )
        spec = getattr(datamodule, "tokenizer_spec", None)
        if isinstance(spec, str):
            self.tokenizer_spec = spec
        if self.run_config is None and hasattr(datamodule, "run_data"):
            self.run_config = {"model": {"task": self.task}, "data": datamodule.run_data()}

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

    def training_loss(self, batch: Batch) -> torch.Tensor:
        return self.loss(batch)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        # The step's loss is the mean over ranks (what the gradients average): it is what gets logged, and a NaN on
        # any rank stops all of them at once; a rank stopping alone would leave the others waiting forever.
        step_loss = self.trainer.strategy.reduce(loss.detach().clone(), reduce_op="mean")  # reduces in place
        if not torch.isfinite(step_loss):
            raise NonFiniteLossError("training loss", self.global_step)
        self.log("train_loss", step_loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def token_mean_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (logits (T, V), labels (T,), IGNORE_INDEX where none) averaged over the predicted tokens of the
        whole step: with several ranks, a rank's sum is divided by the ranks' mean count of tokens, so that the mean
        over ranks (of the loss and of DDP's gradients) is one process's loss over the whole batch. A rank's own mean
        would weigh each token by how few its rank has (masked LM batches differ in their number of masks)."""
        total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        count = (labels != IGNORE_INDEX).sum().to(total.dtype)
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
        encoder: TextEncoderConfig,
        decoder: TextDecoderConfig,
        num_latents: int,
        num_latent_channels: int,
        activation_checkpointing: bool = False,
        activation_offloading: bool = False,
        routing_init: Literal["random", "blocks"] = "random",
        params: str | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ):
        """Perceiver IO masked language model (`MaskedLanguageModelConfig`'s fields).

        Args:
            encoder: Encoder and input adapter (`TextEncoderConfig`; a dict of its fields works too).
            decoder: Decoder and output adapter (`TextDecoderConfig`; a dict of its fields works too).
            num_latents: Number of latent vectors.
            num_latent_channels: Channels of each latent vector.
            activation_checkpointing: Recompute activations in the backward pass to save memory.
            activation_offloading: Keep saved activations in host memory.
            routing_init: "random" (as the reference) or "blocks" (see models/mlm/block_routing.py).
            params: Weights to start from: a checkpoint or safetensors file, an exported model directory or a
                Hugging Face Hub model name (e.g. krasserm/perceiver-io-mlm).
            optimizer: `perceiver train`'s optimizer settings (name, lr, ...), used unless --optimizer is given.
            scheduler: `perceiver train`'s learning-rate schedule (name, warmup_steps, ...).
        """
        super().__init__(optimizer, scheduler)
        config = MaskedLanguageModelConfig.from_dict(
            dict(
                encoder=_as_dict(encoder),
                decoder=_as_dict(decoder),
                num_latents=num_latents,
                num_latent_channels=num_latent_channels,
                activation_checkpointing=activation_checkpointing,
                activation_offloading=activation_offloading,
                routing_init=routing_init,
            )
        )
        self.save_hyperparameters(config.to_dict() | dict(params=params, optimizer=optimizer, scheduler=scheduler))
        self.model = MaskedLanguageModel(config)
        if params is not None:
            self.start_from(params)

    @classmethod
    def create(cls, config: MaskedLanguageModelConfig, **kwargs: Any) -> "LitMaskedLanguageModel":
        return cls(**config.to_dict(), **kwargs)

    def loss(self, batch: Batch) -> torch.Tensor:
        """Cross-entropy on the masked positions only; the decoder computes no other position."""
        labels = batch["labels"]  # (B, M), IGNORE_INDEX where no prediction is wanted
        positions = masked_positions(labels)  # (B, S); the tail of shorter rows drops out of the loss
        logits = self.run_model(batch["input_ids"], batch.get("pad_mask"), output_positions=positions)  # (B, S, V)
        return self.token_mean_loss(logits.flatten(0, 1), labels.gather(1, positions).flatten())


class LitCausalLanguageModel(LitLanguageModel):
    task = "clm"

    def __init__(
        self,
        vocab_size: int = 262,
        max_seq_len: int = 4096,
        max_latents: int = 512,
        num_channels: int = 512,
        num_heads: int = 8,
        max_heads_parallel: int | None = None,
        num_self_attention_layers: int = 8,
        num_self_attention_rotary_layers: int = 1,
        self_attention_widening_factor: int = 4,
        cross_attention_widening_factor: int = 4,
        cross_attention_dropout: float = 0.5,
        post_attention_dropout: float = 0.0,
        residual_dropout: float = 0.0,
        output_norm: bool = False,
        output_bias: bool = True,
        abs_pos_emb: bool = True,
        init_scale: float = 0.02,
        activation_checkpointing: bool = False,
        activation_offloading: bool = False,
        params: str | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        short_windows: dict[str, int] | None = None,
    ):
        """Perceiver AR causal language model (`CausalLanguageModelConfig`'s fields, with its defaults).

        Args:
            vocab_size: Number of token ids (the Lightning CLI links it to the data module's).
            max_seq_len: Longest input, prefix plus latents (the Lightning CLI links it to the data module's).
            max_latents: Number of latent positions: the last positions of the input, the ones predicted.
            num_channels: Model width.
            num_heads: Attention heads.
            max_heads_parallel: Attend with at most this many heads at a time (bounds memory).
            num_self_attention_layers: Self-attention layers over the latents.
            num_self_attention_rotary_layers: Self-attention layers with rotary position embedding (-1: all).
            cross_attention_dropout: Fraction of prefix positions dropped per example in training.
            post_attention_dropout: Dropout on attention probabilities.
            residual_dropout: Dropout on residual branches.
            params: Weights to start from: a checkpoint or safetensors file, an exported model directory or a
                Hugging Face Hub model name.
            optimizer: `perceiver train`'s optimizer settings (name, lr, ...), used unless --optimizer is given.
            scheduler: `perceiver train`'s learning-rate schedule (name, warmup_steps, ...).
            short_windows: The window curriculum (`RunConfig.short_windows`): for the first `steps` training steps,
                each batch's windows are cut into pieces of `seq_len` tokens, each predicting its last `latents`.
        """
        values = locals()
        super().__init__(optimizer, scheduler)
        config = CausalLanguageModelConfig(**{f.name: values[f.name] for f in fields(CausalLanguageModelConfig)})
        self.save_hyperparameters(config.to_dict() | dict(params=params, optimizer=optimizer, scheduler=scheduler,
                                                          short_windows=short_windows))
        self.short_windows = short_windows
        self.model = CausalLanguageModel(config)
        if params is not None:
            self.start_from(params)

    @classmethod
    def create(cls, config: CausalLanguageModelConfig, **kwargs: Any) -> "LitCausalLanguageModel":
        return cls(**config.to_dict(), **kwargs)

    def loss(self, batch: Batch, num_latents: int | None = None) -> torch.Tensor:
        """Cross-entropy on the latent positions: the last `num_latents` (default max_latents) positions of each
        (left-padded) sequence."""
        x, labels = batch["input_ids"], batch["labels"]  # (B, N) each; labels are inputs shifted left by one
        pad_mask = batch.get("pad_mask")
        if pad_mask is not None and not pad_mask.any():
            pad_mask = None  # no padding: lets attention use its fused causal kernels
        prefix_len = max(0, x.shape[1] - (num_latents or self.model.max_latents))
        logits = self.run_model(x, prefix_len, pad_mask=pad_mask)  # (B, L, V)
        return self.token_mean_loss(logits.flatten(0, 1), labels[:, prefix_len:].flatten())

    def training_loss(self, batch: Batch) -> torch.Tensor:
        # The window curriculum: short windows first, where a predicted token costs less, so that the model learns
        # the language in more steps before it learns to reach far back (as long-context LMs are trained).
        short = self.short_windows
        if short is not None and self.global_step < short["steps"]:
            return self.loss(short_pieces(batch, short["seq_len"]), num_latents=short["latents"])
        return self.loss(batch)


def _as_dict(config: Any) -> dict[str, Any]:
    """A config's fields: from the dataclass the Lightning CLI builds, or the dict a checkpoint holds."""
    return asdict(config) if is_dataclass(config) else dict(config)


def load_params(source: str, task: str) -> LoadedModel:
    """The model `params` names: a checkpoint or safetensors file written by perceiver, an exported model directory
    (with a config.json: ours, transformers' or the perceiver-io library's) or the name of such a model on the
    Hugging Face Hub."""
    path = Path(source).expanduser()
    if not path.exists():
        from perceiver_cli.models.huggingface.hub import hub_model_directory

        path = hub_model_directory(source)
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(
            f"model.params {source}: a directory must be an exported model (with a config.json)",
            hint="for a run directory of `perceiver train`, pass its checkpoints/last.ckpt",
        )
    loaded = load_model_path(path)
    if loaded.task != task:
        raise UserError(f"model.params {source} is a {TASK_NAMES[loaded.task]}, not a {TASK_NAMES[task]}")
    return loaded
