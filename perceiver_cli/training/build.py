"""Builders: a validated RunConfig becomes a data module, a Lightning model and a Lightning Trainer."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from rich.console import Console

from perceiver_cli.config import RunConfig
from perceiver_cli.data.datamodule import TextDataModule
from perceiver_cli.errors import UserError
from perceiver_cli.models.lightning import LitCausalLanguageModel, LitLanguageModel, LitMaskedLanguageModel
from perceiver_cli.training.callbacks import (
    AtomicCheckpointIO,
    RunSummary,
    LastCheckpoint,
    StopOnSignal,
    Throughput,
)
from perceiver_cli.training.distributed import (
    CollectiveWatch,
    build_strategy,
    gradient_clip_val,
    strategy_callbacks,
    watch_ranks,
)


def resolve_tokenizer(cfg: RunConfig) -> RunConfig:
    """The config with a "bpe:N" tokenizer replaced by the directory of one trained on its training split
    (data/run_tokenizer.py); any other config as it is."""
    from perceiver_cli.data.run_tokenizer import bpe_vocab_size, run_tokenizer

    if bpe_vocab_size(cfg.data.tokenizer) is None:
        return cfg
    path = run_tokenizer(cfg.data.tokenizer, cfg.source_options(), streaming=cfg.data.streaming)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"tokenizer": str(path)})})


def build_datamodule(cfg: RunConfig) -> TextDataModule:
    d = cfg.data
    o = cfg.source_options()
    datamodule = TextDataModule(
        cfg.task,
        source=o["source"],
        path=o["path"],
        name=o["name"],
        config=o["config"],
        text_column=o["text_column"],
        document=o["document"],
        tokenizer=d.tokenizer,
        max_seq_len=d.max_seq_len,
        batch_size=d.batch_size,
        num_workers=d.num_workers,
        padding_side=d.padding_side,
        random_shift=d.random_shift,
        random_truncation=d.random_truncation,
        min_seq_len=d.min_seq_len,
        mask_prob=d.mask_prob,
        whole_word_masking=d.whole_word_masking,
        static_masking=d.static_masking,
        validation_fraction=o["validation_fraction"],
        seed=o["seed"],
        streaming=d.streaming,
        shuffle_buffer=d.shuffle_buffer,
        validation_documents=d.validation_documents,
        repeat=cfg.trainer.max_epochs is not None,  # a stream is read once unless max_epochs asks for more passes
    )
    cfg.check_vocab_size(datamodule.vocab_size)
    return datamodule


def build_lit_model(cfg: RunConfig, vocab_size: int) -> LitLanguageModel:
    """The Lightning model for the config, optionally starting from the weights named by `model.init_from`."""
    lit_class = LitCausalLanguageModel if cfg.task == "clm" else LitMaskedLanguageModel
    lit = lit_class.create(
        cfg.backend_config(vocab_size),
        optimizer=cfg.optimizer.model_dump(mode="json"),
        scheduler=cfg.scheduler.model_dump(mode="json"),
        **({"short_windows": cfg.short_windows()} if cfg.task == "clm" else {}),
    )
    lit.tokenizer_spec = cfg.data.tokenizer
    lit.run_config = cfg.model_dump(mode="json")
    if cfg.model.init_from:
        init_from_weights(lit, cfg.model.init_from, cfg.task)
    if cfg.trainer.compile:
        lit.compile_model()
    return lit


def init_from_weights(lit: LitLanguageModel, source: str, task: str) -> None:
    from perceiver_cli.checkpoints import load_model

    loaded = load_model(source, task=task)
    mismatched = [
        name
        for name, tensor in loaded.model.state_dict().items()
        if name not in lit.model.state_dict() or lit.model.state_dict()[name].shape != tensor.shape
    ]
    if mismatched or loaded.model.state_dict().keys() != lit.model.state_dict().keys():
        raise UserError(
            f"model.init_from {source}: its architecture differs from the preset's "
            f"({len(mismatched)} tensors differ in name or shape, e.g. {', '.join(mismatched[:3]) or 'missing keys'})",
            hint="make the [model] section match the source model (perceiver presets show, or the source's config)",
        )
    lit.model.load_state_dict(loaded.model.state_dict())


def build_trainer(
    cfg: RunConfig, run_dir: Path, console: Console, bytes_per_token: float | None, resumed: bool = False
) -> pl.Trainer:
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

    from perceiver_cli.data.streaming import StreamCheckpoint
    from perceiver_cli.training.loggers import LogConfig, build_loggers
    from perceiver_cli.training.progress import StepProgress

    t = cfg.trainer
    steps_interval = isinstance(t.val_check_interval, int)
    checkpoints = run_dir / "checkpoints"
    best = ModelCheckpoint(
        dirpath=checkpoints, filename="best", monitor="val_loss", mode="min", save_top_k=1,
        enable_version_counter=False,
    )
    # `last` is saved at every validation, at the end and on Ctrl-C (see LastCheckpoint), so a killed run loses at
    # most one validation interval.
    last = ModelCheckpoint(
        dirpath=checkpoints, filename="last", save_top_k=1, enable_version_counter=False,
        every_n_train_steps=t.val_check_interval if steps_interval else None,
    )
    throughput = Throughput()
    callbacks = [
        best,
        last,
        throughput,
        StepProgress(throughput, console),
        RunSummary(run_dir, throughput, console, bytes_per_token),
        *([LearningRateMonitor(logging_interval="step")] if cfg.output.loggers else []),  # it needs a logger
        LastCheckpoint(checkpoints / "last.ckpt"),
        LogConfig(cfg.model_dump(mode="json", exclude_none=True)),  # as config.toml has it
        *strategy_callbacks(cfg),
    ]
    if cfg.data.streaming:
        callbacks.append(StreamCheckpoint(checkpoints / "last.ckpt"))
    if cfg.task == "clm" and cfg.output.sample_prompt:
        from perceiver_cli.training.samples import ValidationSample

        callbacks.append(ValidationSample(cfg.output.sample_prompt, cfg.output.sample_max_new_tokens, console))
    callbacks += [CollectiveWatch(t.collective_timeout), StopOnSignal()]  # last: a stop comes after the step's work
    trainer = pl.Trainer(
        default_root_dir=run_dir,
        logger=build_loggers(cfg.output.loggers, run_dir, run_dir.parent.name, Path(cfg.output.dir), resumed),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        max_steps=t.max_steps,
        max_epochs=t.max_epochs,
        max_time=t.max_time,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None if steps_interval else 1,
        limit_val_batches=t.limit_val_batches,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=gradient_clip_val(cfg),
        precision="32-true" if t.precision == "32" else t.precision,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg),
        deterministic=t.deterministic,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    watch_ranks(trainer, t.collective_timeout)
    return trainer
