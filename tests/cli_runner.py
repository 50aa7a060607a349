"""Run the `perceiver` app in-process, through the same error handling as the console script, and lay out run
directories as `perceiver train` writes them."""

import io
import sys
from pathlib import Path

import pytest
import typer

from perceiver_cli import cli
from perceiver_cli.checkpoints import write_checkpoint


def run_cli(
    capsys, *args: str, app: typer.Typer = cli.app, stdin: bytes | None = None, monkeypatch=None
) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `perceiver ARGS`; `stdin` (with `monkeypatch`) feeds standard input."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(SystemExit) as exit_:
        cli.run_app(app, list(args))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def write_run(root: Path, name: str, task: str, model, config, run_config: dict | None = None) -> Path:
    """A run directory as `perceiver train` writes it: runs/NAME/version_0/{config.toml, checkpoints/last.ckpt}."""
    run = root / "runs" / name / "version_0"
    run_config = run_config or {"model": {"task": task}}
    write_checkpoint(run / "checkpoints" / "last.ckpt", task, model, config, run_config=run_config)
    (run / "config.toml").write_text(f'[model]\ntask = "{task}"\n', encoding="utf-8")
    return run


def assert_one_error(status: int, err: str, fragment: str, out: str = "") -> None:
    """A user mistake: exit status 2, exactly one `error:` line, `fragment` in the message, no traceback."""
    assert status == 2, (status, err)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment.lower() in err.lower(), err  # details may follow on indented lines
    assert "Traceback" not in out + err
