"""The `perceiver` command line: global options, error reporting, and the `presets` commands."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from perceiver_cli import __version__, cli
from perceiver_cli.errors import UserError
from perceiver_cli.presets import list_presets, presets_dir, resolve_preset
from cli_runner import run_cli

HEAVY_MODULES = ["torch", "pytorch_lightning", "lightning", "transformers", "datasets", "pydantic"]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    # `--debug` sets PERCEIVER_DEBUG in this process; monkeypatch puts the variable back after each test.
    monkeypatch.setenv("PERCEIVER_DEBUG", "0")


def run_module(*args: str) -> subprocess.CompletedProcess:
    """Run `python -m perceiver_cli ARGS` as a user would, with debugging off."""
    env = {**os.environ, "PERCEIVER_DEBUG": "0"}
    return subprocess.run(
        [sys.executable, "-m", "perceiver_cli", *args], check=False, capture_output=True, text=True, env=env, timeout=60
    )


def test_help_lists_the_subcommands():
    result = run_module("--help")
    assert result.returncode == 0, result.stderr
    assert "presets" in result.stdout


def _modules_left_imported(*argvs: list[str]) -> list[str]:
    """Which HEAVY_MODULES a fresh interpreter holds after running the app on each argv (all must exit 0)."""
    code = f"""
import json, sys
from typer.testing import CliRunner
import perceiver_cli.cli as cli

codes = [CliRunner().invoke(cli.app, argv).exit_code for argv in {list(argvs)!r}]
print(json.dumps({{"codes": codes, "heavy": [m for m in {HEAVY_MODULES!r} if m in sys.modules]}}))
"""
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["codes"]) == {0}, report
    return report["heavy"]


def test_help_and_version_import_no_heavy_module():
    assert _modules_left_imported(["--help"], ["--version"]) == []


def test_every_command_help_imports_no_heavy_module():
    # Typer itself imports pydantic to coerce a subcommand's parameters (even for --help), so only the
    # project's own heavy imports are checked here.
    names = list(typer.main.get_command(cli.app).commands)
    assert set(_modules_left_imported(*[[name, "--help"] for name in names])) <= {"pydantic"}


def test_version(capsys):
    status, out, _ = run_cli(capsys, "--version")
    assert status == 0
    assert out == f"perceiver {__version__}\n"


def test_usage_error_exits_2(capsys):
    status, _, err = run_cli(capsys, "presets", "no-such-command")
    assert status == 2
    assert "No such command" in err


def test_presets_list_shows_names_and_descriptions(capsys):
    status, out, _ = run_cli(capsys, "presets", "list")
    assert status == 0
    assert "clm-small" in out and "mlm-small" in out
    assert "Perceiver AR causal LM" in out


def test_presets_show_prints_the_toml(capsys):
    status, out, _ = run_cli(capsys, "presets", "show", "clm-small")
    assert status == 0
    assert 'task = "clm"' in out
    assert out == (presets_dir() / "clm-small.toml").read_text(encoding="utf-8")


def test_presets_copy_writes_the_same_text_and_keeps_an_existing_file(capsys, tmp_path):
    dest = tmp_path / "x.toml"
    original = (presets_dir() / "clm-small.toml").read_text(encoding="utf-8")

    status, _, _ = run_cli(capsys, "presets", "copy", "clm-small", str(dest))
    assert status == 0
    assert dest.read_text(encoding="utf-8") == original

    dest.write_text("# edited\n", encoding="utf-8")
    status, _, err = run_cli(capsys, "presets", "copy", "clm-small", str(dest))
    assert status == 2
    assert "exists" in err
    assert dest.read_text(encoding="utf-8") == "# edited\n"

    status, _, _ = run_cli(capsys, "presets", "copy", "clm-small", str(dest), "--force")
    assert status == 0
    assert dest.read_text(encoding="utf-8") == original
    assert [path.name for path in tmp_path.iterdir()] == ["x.toml"]  # no temporary file left behind


def test_presets_copy_into_a_directory_uses_the_preset_name(capsys, tmp_path):
    status, _, _ = run_cli(capsys, "presets", "copy", "mlm-small", str(tmp_path))
    assert status == 0
    assert 'task = "mlm"' in (tmp_path / "mlm-small.toml").read_text(encoding="utf-8")


def test_unknown_preset_is_one_line_listing_the_known_names():
    result = run_module("presets", "show", "no-such-preset")
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown preset 'no-such-preset'")
    assert "built-in presets: " + ", ".join(list_presets()) in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stdout + result.stderr


def test_resolve_preset_prefers_an_existing_toml_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("clm-small.toml").write_text("# mine\n", encoding="utf-8")
    assert resolve_preset("clm-small.toml") == Path("clm-small.toml")
    assert resolve_preset("clm-small") == presets_dir() / "clm-small.toml"


@pytest.mark.parametrize("bad", ["dir", "missing.toml", "dir/missing.toml"])
def test_resolve_preset_rejects_directories_and_missing_files(tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    Path("dir").mkdir()
    with pytest.raises(UserError, match="directory|does not exist"):
        resolve_preset(bad)


def _failing_app(exception: BaseException) -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)

    @app.command()
    def fail() -> None:
        raise exception

    return app


def test_user_error_in_a_command_is_one_line_and_exit_2(capsys):
    status, _, err = run_cli(capsys, app=_failing_app(UserError("the thing is broken; fix it")))
    assert status == 2
    assert err == "error: the thing is broken; fix it\n"


def test_user_error_hint_goes_on_a_second_line(capsys):
    status, _, err = run_cli(capsys, app=_failing_app(UserError("the thing is broken", hint="fix it")))
    assert status == 2
    assert err == "error: the thing is broken\nhint: fix it\n"


def test_debug_option_shows_the_exception(capsys):
    with pytest.raises(UserError, match="unknown preset"):
        cli.main(["--debug", "presets", "show", "no-such-preset"])


def test_debug_environment_variable_shows_the_exception(monkeypatch):
    monkeypatch.setenv("PERCEIVER_DEBUG", "1")
    with pytest.raises(UserError):
        cli.run_app(_failing_app(UserError("broken")), [])


def test_keyboard_interrupt_exits_130_with_a_message(capsys):
    status, _, err = run_cli(capsys, app=_failing_app(KeyboardInterrupt()))
    assert status == 130
    assert err == "error: interrupted\n"
