"""Finding, reading and copying preset TOML files, built-in (by name) or the user's own (by path).

This module only deals with files; parsing and validating a preset's content is the config layer's job. It stays
light (no pydantic, no torch) because `perceiver presets ...` and `perceiver --help` import it.
"""

import os
from importlib import resources
from pathlib import Path

from perceiver_cli.errors import UserError
from perceiver_cli.files import refuse_existing, write_atomically


def presets_dir() -> Path:
    """The folder of built-in presets: inside the package when installed from a wheel, else the repo's `presets/`."""
    packaged = resources.files(__package__) / "presets"
    # A wheel installs to disk, so the packaged folder is a real Path; an editable install has no such folder.
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    in_repo = Path(__file__).resolve().parent.parent / "presets"
    if in_repo.is_dir():
        return in_repo
    raise UserError("the built-in presets are missing from this installation", hint="reinstall perceiver-cli")


def list_presets() -> list[str]:
    """Names of the built-in presets, sorted."""
    return sorted(path.stem for path in presets_dir().glob("*.toml"))


def resolve_preset(name_or_path: str) -> Path:
    """The preset file for a built-in name or a path to a `.toml` file.

    Anything ending in `.toml` or containing a path separator is a path, so a stray local file can never
    shadow a built-in name.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        raise UserError(f"'{name_or_path}' is a directory, not a preset; pass a .toml file or a built-in preset name")
    separators = {os.sep, os.altsep} - {None}
    if path.suffix == ".toml" or any(sep in name_or_path for sep in separators):
        if not path.is_file():
            raise UserError(f"preset file '{name_or_path}' does not exist; check the path or use a built-in preset")
        return path
    builtin = presets_dir() / f"{name_or_path}.toml"
    if builtin.is_file():
        return builtin
    raise UserError(
        f"unknown preset '{name_or_path}'; built-in presets: {', '.join(list_presets())}; "
        "or pass a path to a .toml file"
    )


def read_preset_text(name_or_path: str) -> str:
    """The TOML text of a preset, as stored."""
    return _read_text(resolve_preset(name_or_path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read preset file '{path}': {err}") from err


def describe_preset(name_or_path: str) -> str:
    """A preset's description: the text of its first comment line, or '' if it has none."""
    for line in read_preset_text(name_or_path).splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def copy_preset(name_or_path: str, dest: Path, force: bool = False) -> Path:
    """Write a preset's TOML to `dest` (or `dest/NAME.toml` if `dest` is a directory) and return the path written.
    An existing file is kept unless `force`; the write is atomic (`files.write_atomically`)."""
    source = resolve_preset(name_or_path)
    text = _read_text(source)
    target = dest / f"{source.stem}.toml" if dest.is_dir() else dest
    refuse_existing(target, force)
    if not target.parent.is_dir():
        raise UserError(f"directory '{target.parent}' does not exist; create it first")
    try:
        write_atomically(target, text)
    except OSError as err:
        raise UserError(f"cannot write '{target}': {err}") from err
    return target
