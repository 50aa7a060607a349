"""The `perceiver` command line: the Typer app, its global options, and how errors reach the user.

`perceiver --help` and `--version` must answer fast, so neither this module nor any command module imports torch,
Lightning, transformers, datasets or pydantic at import time; commands import them inside their bodies.
"""

import importlib
import os
import sys
from typing import Annotated

import typer

from perceiver_cli import __version__
from perceiver_cli.errors import UserError

# The subcommands, in the order `perceiver --help` lists them. Adding one is one line here:
# "command-name": "module:attribute" under perceiver_cli/commands/, the attribute being a function (a command)
# or a typer.Typer (a group of commands).
COMMANDS = {
    "train": "train:train",
    "eval": "eval:evaluate",
    "generate": "generate:generate",
    "fill-mask": "fill_mask:fill_mask",
    "serve": "serve:serve",
    "convert": "convert:convert",
    "presets": "presets:app",
    "tokenizer": "tokenizer:app",
}

# Plain click help (rich_markup_mode=None) renders without importing rich, in half the time of rich help.
# Tracebacks belong to --debug only, so Typer's pretty exception hook is off.
app = typer.Typer(
    name="perceiver",
    help="Train, evaluate and run Perceiver IO (masked LM) and Perceiver AR (causal LM) models.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _register(name: str, target: str) -> None:
    module_name, attribute = target.split(":")
    command = getattr(importlib.import_module(f"perceiver_cli.commands.{module_name}"), attribute)
    if isinstance(command, typer.Typer):
        app.add_typer(command, name=name)
    else:
        app.command(name)(command)


for _name, _target in COMMANDS.items():
    _register(_name, _target)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"perceiver {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of errors (same as PERCEIVER_DEBUG=1).")
    ] = False,
) -> None:
    # The environment variable is the one switch: the error handler in run_app reads it, and child processes
    # (DDP ranks re-running the command) inherit it.
    if debug:
        os.environ["PERCEIVER_DEBUG"] = "1"


def _debug_enabled() -> bool:
    return os.environ.get("PERCEIVER_DEBUG", "") not in ("", "0")


def _report(message: str, hint: str | None = None) -> None:
    """Print `error: message` (and `hint: ...`) to stderr, styled only when stderr is a terminal."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.text import Text

        # soft_wrap: the terminal wraps a long message; rich would break it into several lines.
        console = Console(stderr=True, soft_wrap=True)
        console.print(Text.assemble(("error: ", "bold red"), message))
        if hint:
            console.print(Text.assemble(("hint: ", "bold yellow"), hint))
    else:
        print(f"error: {message}", file=sys.stderr)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)


def run_app(typer_app: typer.Typer, args: list[str] | None = None) -> None:
    """Run `typer_app` and exit: a UserError becomes one line on stderr and exit status 2 (unless debugging).

    Click itself already exits 2 on usage errors. Typer turns Ctrl-C into a silent exit 130; we say why.
    """
    try:
        typer_app(args=args, prog_name="perceiver")
    except UserError as err:
        if _debug_enabled():
            raise
        _report(err.message, err.hint)
        sys.exit(2)
    except SystemExit as exit_:
        if exit_.code == 130 and _is_rank_zero():
            _report("interrupted")
        raise


def _is_rank_zero() -> bool:
    """Whether this process speaks for the run: the other ranks of a multi-process run stop with it, silently."""
    from perceiver_cli.training.run_dir import process_rank

    return process_rank() == 0


def main(args: list[str] | None = None) -> None:
    """Entry point of the `perceiver` console script."""
    run_app(app, args)
