"""`perceiver presets list|show|copy`: browse the built-in presets and copy one to edit."""

import sys
from pathlib import Path
from typing import Annotated

import typer

from perceiver_cli import presets

app = typer.Typer(help="List, show and copy the built-in presets.", no_args_is_help=True)


@app.command("list")
def list_() -> None:
    """List the built-in presets with their descriptions."""
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "description", box=None, pad_edge=False)
    for name in presets.list_presets():
        table.add_row(name, presets.describe_preset(name))
    Console().print(table)


@app.command()
def show(name: Annotated[str, typer.Argument(help="A built-in preset name or a path to a .toml file.")]) -> None:
    """Print a preset's TOML (highlighted on a terminal, plain when piped)."""
    text = presets.read_preset_text(name)
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.syntax import Syntax

        # Terminal colours and no background, so it reads on light and dark terminals; wrap rather than crop.
        syntax = Syntax(text.rstrip("\n"), "toml", theme="ansi_dark", background_color="default", word_wrap=True)
        Console().print(syntax)
    else:
        sys.stdout.write(text)


@app.command()
def copy(
    name: Annotated[str, typer.Argument(help="A built-in preset name or a path to a .toml file.")],
    dest: Annotated[Path, typer.Argument(help="The file to write, or a directory to write NAME.toml into.")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing file.")] = False,
) -> None:
    """Copy a preset to a file you can edit and pass to other commands with --preset."""
    written = presets.copy_preset(name, dest, force=force)
    typer.echo(f"wrote {written}")
