"""`perceiver convert`: move models between this tool and the Hugging Face ecosystem, numerically exact.

    perceiver convert --to hf [--model RUN|CKPT] OUT_DIR [--remote-code]
    perceiver convert --to safetensors [--model RUN|CKPT] OUT_FILE
    perceiver convert --from hf IN_DIR [OUT]

Outputs are written atomically and never replace an existing file or directory without --force.
"""

from pathlib import Path
from typing import Annotated

import typer

from perceiver_cli.errors import UserError
from perceiver_cli.files import refuse_existing

TARGETS = ("hf", "safetensors")
SOURCES = ("hf",)


def convert(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="With --to: the directory (hf) or file (safetensors) to write. With --from: the Hugging Face model "
            "directory to read, then optionally the checkpoint to write (default: IN_DIR.ckpt next to it; a "
            ".safetensors name writes that format).",
            show_default=False,
            metavar="PATHS",
        ),
    ],
    to: Annotated[
        str | None, typer.Option("--to", help="Export a model: 'hf' (a transformers directory) or 'safetensors'.")
    ] = None,
    from_: Annotated[
        str | None, typer.Option("--from", help="Import a model: 'hf' (a transformers or perceiver-io directory).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="With --to: the run directory, checkpoint or model directory to export (default: the most recent run)."
        ),
    ] = None,
    remote_code: Annotated[
        bool,
        typer.Option(
            "--remote-code",
            help="With --to hf, causal LMs: include a self-contained modeling file, loadable with "
            "trust_remote_code=True where perceiver_cli is not installed.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")] = False,
) -> None:
    """Convert models to and from the Hugging Face format (and to plain safetensors).

    \b
      perceiver convert --to hf [--model RUN|CKPT] OUT_DIR [--remote-code]
      perceiver convert --to safetensors [--model RUN|CKPT] OUT_FILE
      perceiver convert --from hf IN_DIR [OUT]
    """
    if (to is None) == (from_ is None):
        raise UserError("give either --to hf|safetensors (export) or --from hf (import)")
    if to is not None:
        if to not in TARGETS:
            raise UserError(f"unknown --to {to!r}: use {' or '.join(TARGETS)}")
        if len(paths) != 1:
            raise UserError(f"--to {to} writes one output: give only OUT (the model to export goes in --model)")
        if remote_code and to != "hf":
            raise UserError("--remote-code goes with --to hf")
        _export(to, model, paths[0], remote_code, force)
    else:
        if from_ not in SOURCES:
            raise UserError(f"unknown --from {from_!r}: use {' or '.join(SOURCES)}")
        if model is not None:
            raise UserError("--model names a model to export; with --from, give the directory to import: IN_DIR [OUT]")
        if remote_code:
            raise UserError("--remote-code goes with --to hf")
        if len(paths) > 2:
            raise UserError("--from hf takes IN_DIR and optionally OUT")
        _import(paths[0], paths[1] if len(paths) == 2 else None, force)


def _export(target: str, model: str | None, out: Path, remote_code: bool, force: bool) -> None:
    from perceiver_cli.checkpoints import write_safetensors
    from perceiver_cli.model_choice import choose_model

    refuse_existing(out, force)  # before the slow loading
    if target == "safetensors" and out.is_dir():
        raise UserError(f"{out} is a directory; name the .safetensors file to write")
    loaded = choose_model(model, task=None)
    if target == "safetensors":
        write_safetensors(out, loaded.task, loaded.model, loaded.config, loaded.tokenizer, loaded.run_config)
        typer.echo(f"wrote {out} ({loaded.task}; load it with --model {out})")
        return

    from perceiver_cli.models.huggingface import save_pretrained_directory

    save_pretrained_directory(loaded, out, remote_code=remote_code, force=force)
    typer.echo(f"wrote {out}")
    if loaded.task == "mlm":
        typer.echo(f"load it with transformers.AutoModelForMaskedLM.from_pretrained({str(out)!r})")
    elif remote_code:
        typer.echo(
            f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True) "
            "(AutoTokenizer needs trust_remote_code=True too)"
        )
    else:
        typer.echo(
            "load it with `import perceiver_cli.models.huggingface` (registers the model type), then "
            f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})"
        )


def _import(in_dir: Path, out: Path | None, force: bool) -> None:
    if not in_dir.is_dir():
        raise UserError(f"{in_dir} is not a directory", hint="--from hf reads a Hugging Face model directory")
    if not (in_dir / "config.json").is_file():
        raise UserError(f"{in_dir} has no config.json, so it is not a Hugging Face model directory")
    if out is None:
        resolved = in_dir.resolve()
        out = resolved.with_name(resolved.name + ".ckpt")
    refuse_existing(out, force)
    if out.is_dir():
        raise UserError(f"{out} is a directory; name the checkpoint file to write")

    from perceiver_cli.checkpoints import write_checkpoint, write_safetensors
    from perceiver_cli.models.huggingface import load_pretrained_directory

    loaded = load_pretrained_directory(in_dir)
    write = write_safetensors if out.suffix == ".safetensors" else write_checkpoint
    write(out, loaded.task, loaded.model, loaded.config, loaded.tokenizer)
    num_parameters = sum(p.numel() for p in loaded.model.parameters())
    typer.echo(f"wrote {out} ({loaded.task}, {num_parameters:,} parameters, tokenizer {loaded.tokenizer})")

