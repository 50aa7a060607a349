"""Run the `perceiver` app in-process, through the same error handling as the console script."""

import pytest
import typer

from perceiver_cli import cli


def run_cli(capsys, *args: str, app: typer.Typer = cli.app) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `perceiver ARGS`."""
    with pytest.raises(SystemExit) as exit_:
        cli.run_app(app, list(args))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err
