"""What `perceiver train` does, step by step: resolve the config, describe it (dry run) or build and fit."""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

from rich.console import Console

from perceiver_cli.config import RunConfig, apply_overrides, load_run_config, parse_toml, to_toml, validate
from perceiver_cli.errors import UserError
from perceiver_cli.files import write_atomically
from perceiver_cli.runs import resume_checkpoint, run_dir_of
from perceiver_cli.training.launch import Launch, check_layout
from perceiver_cli.training.run_dir import RUN_DIR_ENV, run_dir_for


def resolve(preset: str, overrides: list[str], resume: str | None, output: Path | None) -> tuple[RunConfig, str, Path | None]:
    """The run config, the run name and the checkpoint to resume from (if any).

    Resuming continues the run as it was configured: its saved config.toml, plus this call's --set overrides
    (for example a larger trainer.max_steps).
    """
    cfg, preset_name = load_run_config(preset, overrides, output_dir=output)
    name = cfg.output.name or preset_name
    if resume is None:
        return cfg, name, None
    checkpoint = resume_checkpoint(resume, Path(cfg.output.dir), name)
    saved = run_dir_of(checkpoint) / "config.toml"
    if saved.is_file():
        values = apply_overrides(parse_toml(saved.read_text(), str(saved)), overrides)
        cfg = validate(values, str(saved))
    return cfg, name, checkpoint


def count_parameters(cfg: RunConfig, vocab_size: int) -> int:
    """Parameter count without allocating memory: the model is built on the meta device."""
    import torch

    from perceiver_cli.models.saved_model import build_backend_model

    with torch.device("meta"):
        model, _ = build_backend_model(cfg.task, cfg.backend_config(vocab_size).to_dict())
    return sum(p.numel() for p in model.parameters())


def dry_run(cfg: RunConfig, name: str, console: Console) -> None:
    """Print the resolved config, parameter count, memory and tokens per step; build nothing that allocates."""
    from perceiver_cli.training.loggers import check_loggers

    check_loggers(cfg.output.loggers)
    vocab_size = cfg.vocab_size()
    params = count_parameters(cfg, vocab_size)
    t, d = cfg.trainer, cfg.data
    devices = t.devices if isinstance(t.devices, int) else 1
    tokens_per_step = d.batch_size * d.max_seq_len * t.accumulate_grad_batches * devices * t.num_nodes
    state_bytes = params * 4 * 4  # fp32 weights, gradients and the optimizer's two moments
    console.print(to_toml(cfg), markup=False, highlight=False)
    console.print(f"run name            {name}  (under {cfg.output.dir}/{name}/)")
    console.print(f"task                {cfg.task}")
    console.print(f"vocabulary          {vocab_size:,} ({d.tokenizer})")
    console.print(f"parameters          {params:,}")
    console.print(f"weights+grads+optim {state_bytes / 2**30:,.2f} GiB (fp32, per device, before activations)")
    console.print(f"activations (rough) {activation_bytes(cfg) / 2**30:,.2f} GiB per device")
    console.print(f"tokens per step     {tokens_per_step:,} ({d.batch_size} x {d.max_seq_len} x "
                  f"{t.accumulate_grad_batches} accumulation x {devices * t.num_nodes} devices)")
    if (short := cfg.short_windows()) is not None:
        console.print(f"window curriculum   steps 1-{short['steps']:,}: pieces of {short['seq_len']:,} tokens, "
                      f"{short['latents']:,} latents each")


def activation_bytes(cfg: RunConfig) -> int:
    """A rough activation-memory estimate (fp32, no checkpointing): the tensors a backward pass keeps per layer."""
    d = cfg.data
    b, n = d.batch_size, d.max_seq_len
    if cfg.task == "clm":
        m = cfg.model
        c, latents = m.num_channels, min(m.max_latents, n)
        per_latent_layer = b * latents * c * (10 + 2 * m.self_attention_widening_factor)
        cross = b * n * c * 6 + b * m.num_heads * latents * n  # prefix norms, keys, values; attention weights
        layers = m.num_self_attention_layers + 1
    else:
        m = cfg.model
        c, dl = m.encoder.num_input_channels, m.num_latent_channels
        per_latent_layer = b * m.num_latents * dl * (10 + 2 * m.encoder.self_attention_widening_factor)
        cross = b * n * c * 6 + b * n * dl  # encoder inputs and keys/values; decoder queries of masked positions
        layers = m.encoder.num_self_attention_layers_per_block * m.encoder.num_self_attention_blocks + 2
    fsdp = cfg.trainer.fsdp if cfg.trainer.strategy == "fsdp" else None
    if m.activation_checkpointing or (fsdp is not None and fsdp.activation_checkpointing):
        layers = 2  # roughly one layer's activations live at a time, plus the checkpointed inputs
    return 4 * (cross + layers * per_latent_layer)


def bytes_per_token(datamodule) -> float | None:
    """UTF-8 bytes per token of the validation split, so that a causal LM's validation loss converts to bits per
    byte: 1 with the UTF-8 tokenizer, else measured on the split's first tokens (`pipeline.bytes_per_token`). None
    for masked LMs (their loss covers masked tokens only) and other tokenizers on streamed data (no split up front);
    `perceiver eval` measures bits per byte exactly."""
    if datamodule.task != "clm":
        return None
    if datamodule.tokenizer_spec == "utf8":
        return 1.0
    if datamodule.streaming:
        return None
    from perceiver_cli.data.pipeline import bytes_per_token as split_bytes_per_token

    return split_bytes_per_token(datamodule.chunks["validation"], datamodule.tokenizer)


def fit(cfg: RunConfig, name: str, checkpoint: Path | None, console: Console, launch: Launch) -> Path:
    """Build everything and train; returns the run directory. `launch`: who started this process."""
    quiet_libraries(launch.rank)  # before Lightning is imported: some of its notes come at import time
    import pytorch_lightning as pl
    import torch

    # Subnormal floats make the CPU's matrix products several times slower, and block routing's sharp attention
    # (mlm-small) produces them. Flush them to zero here, before torch starts its intra-op threads: they inherit it.
    torch.set_flush_denormal(True)

    from perceiver_cli.models.lightning import NonFiniteLossError
    from perceiver_cli.data.run_tokenizer import bpe_vocab_size, keep_in_run_dir
    from perceiver_cli.training.build import build_datamodule, build_lit_model, build_trainer, resolve_tokenizer
    from perceiver_cli.training.callbacks import LastCheckpoint
    from perceiver_cli.training.distributed import CollectiveWatch
    from perceiver_cli.training.loggers import check_loggers
    from perceiver_cli.training.progress import data_preparation

    check_loggers(cfg.output.loggers)  # a missing package must cost seconds, not a data preparation

    trainer_section, layout_note = check_layout(cfg.trainer, launch)
    cfg = cfg.model_copy(update={"trainer": trainer_section})
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    trained_tokenizer = bpe_vocab_size(cfg.data.tokenizer) is not None
    if trained_tokenizer:  # trained on the training split before the data are tokenized with it (seconds; cached)
        spec, cfg = cfg.data.tokenizer, resolve_tokenizer(cfg)
        if launch.local_rank == 0:
            console.print(f"tokenizer {spec}: a byte-level BPE trained on the training split", highlight=False)
    datamodule = build_datamodule(cfg)
    lit = build_lit_model(cfg, datamodule.vocab_size)

    # One process per machine builds the caches, as Lightning's own prepare_data does; the other ranks wait for it
    # inside trainer.fit and load them in setup(). Data comes before the run directory: bad data (a missing file,
    # not UTF-8) must not leave an empty run behind.
    if launch.local_rank == 0:
        title = "opening the stream" if cfg.data.streaming else "preparing data (cached after the first run)"
        with data_preparation(console, title):
            datamodule.prepare_data()

    run_dir = run_dir_for(Path(cfg.output.dir), name, checkpoint, launch)
    if trained_tokenizer and launch.rank == 0:  # the run's config and checkpoints name its own copy
        kept = str(keep_in_run_dir(Path(cfg.data.tokenizer), run_dir))
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"tokenizer": kept})})
        lit.tokenizer_spec = datamodule.tokenizer_spec = kept
        lit.run_config = cfg.model_dump(mode="json")
    if launch.rank == 0:
        write_atomically(run_dir / "config.toml", to_toml(cfg))
    params = sum(p.numel() for p in lit.model.parameters())
    console.print(f"[bold]{name}[/]: {cfg.task} model with {params:,} parameters -> {run_dir}", soft_wrap=True)
    if layout_note:
        console.print(layout_note)
    if checkpoint is not None:
        console.print(f"resuming from {checkpoint}")
    if launch.local_rank == 0:
        console.print(_describe_data(cfg, datamodule), highlight=False, soft_wrap=True)
        if (short := cfg.short_windows()) is not None:
            console.print(f"window curriculum: steps 1-{short['steps']:,} on pieces of {short['seq_len']:,} tokens "
                          f"({short['latents']:,} latents each), then whole {cfg.data.max_seq_len:,}-token windows",
                          highlight=False, soft_wrap=True)

    trainer = build_trainer(cfg, run_dir, console, bytes_per_token(datamodule), resumed=checkpoint is not None)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # the ranks Lightning starts (ddp, fsdp) inherit it
    last = run_dir / "checkpoints" / "last.ckpt"

    def kept() -> str:
        return f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"

    try:
        trainer.fit(lit, datamodule=datamodule, ckpt_path=str(checkpoint) if checkpoint else None)
    except NonFiniteLossError as err:
        raise UserError(
            f"{err}; training stopped and {kept()}",
            hint="lower optimizer.lr, raise scheduler.warmup_steps or set trainer.gradient_clip_val, then resume",
        ) from None
    except RuntimeError as err:  # a collective that could not complete: a rank died, stopped or is stuck
        failure = next(c for c in trainer.callbacks if isinstance(c, CollectiveWatch)).describe(err, launch.rank)
        if failure is None:
            raise
        raise UserError(
            f"{failure}; training stopped and {kept()}",
            hint=f"see the other ranks' errors; resume with: perceiver train --preset {name} --resume auto "
                 "(if a rank was busy rather than stuck, raise trainer.collective_timeout)",
        ) from err  # the collective's own error, for --debug
    except SystemExit as exit_:  # Lightning's answer to Ctrl-C and to a clean stop: it saved what it could and exits
        interrupted = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        if interrupted is not None and interrupted.interrupted_at is not None:
            console.print(f"{interrupted.signal_name}: saved step {interrupted.interrupted_at} to {last}; "
                          f"resume with: perceiver train --preset {name} --resume auto", soft_wrap=True)
            raise SystemExit(143 if interrupted.signal_name == "SIGTERM" else 130) from None
        raise exit_
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    return run_dir


def quiet_libraries(rank: int) -> None:
    """Keep the console to what matters: Lightning's device banners, data-loader advice and deprecation notes,
    and the datasets library's per-step progress bars are noise in a training run's output. Ranks other than 0
    keep only warnings and errors (Lightning's "Initializing distributed" line would come once per rank)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*treespec.*LeafSpec.*")
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero", "pytorch_lightning.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*smaller than the logging interval.*")
    if rank > 0:
        import pytorch_lightning  # noqa: F401 (its import sets these loggers' levels, so it must come first)

        for name in ("pytorch_lightning", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _describe_data(cfg: RunConfig, datamodule) -> str:
    sizes = datamodule.describe()
    d = cfg.data
    source = {
        "embedded": f"embedded corpus {d.name or 'prose'}",
        "files": f"files {d.path}" + (f" (one document per {d.document})" if d.document != "paragraph" else ""),
        "hub": f"hub {d.name} {d.config_name or ''}".rstrip(),
    }
    if d.streaming:
        aside = sizes.get("validation_documents")
        validation = f"the first {aside:,} documents set aside" if aside else "its validation split"
        return (f"data: {source[d.source]}: streamed (tokenized as training goes, shuffle buffer {d.shuffle_buffer:,} "
                f"chunks); validation: {validation}")
    parts = [f"{split} {s['tokens']:,} tokens ({s['chunks']:,} chunks)" for split, s in sizes.items()]
    t = cfg.trainer
    processes = (t.devices if isinstance(t.devices, int) else 1) * t.num_nodes  # each takes its share of the chunks
    steps = math.ceil(math.ceil(sizes["train"]["chunks"] / processes) / d.batch_size)
    return f"data: {source[d.source]}: " + ", ".join(parts) + f"; {steps:,} batches per epoch"
