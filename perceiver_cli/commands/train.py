"""`perceiver train`: train a model described by a preset."""

from pathlib import Path
from typing import Annotated

import typer


def train(
    preset: Annotated[str, typer.Option("--preset", "-p", help="Built-in preset name or path to a .toml file.")] = (
        "clm-small"
    ),
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a preset value: key.path=value (repeatable)."),
    ] = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="'auto' (latest run of this name), a run directory or a .ckpt.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the resolved config, size and cost per step; train nothing.")
    ] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Runs directory (default: runs).")] = None,
) -> None:
    """Train a model described by a preset (see `perceiver presets list`)."""
    from rich.console import Console

    from perceiver_cli.training import run
    from perceiver_cli.training.launch import detect_launch

    launch = detect_launch()  # once: every step below asks this one answer
    console = Console(quiet=launch.rank > 0)  # in a multi-process run only rank 0 speaks
    cfg, name, checkpoint = run.resolve(preset, overrides or [], resume, output)
    if dry_run:
        run.dry_run(cfg, name, console)
        return
    run.fit(cfg, name, checkpoint, console, launch)
