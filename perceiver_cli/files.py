"""File safety, in one place: what this tool writes appears whole or not at all, what it reads never runs code, and
nothing that exists is replaced without `--force`.

Every writer of the package goes through `atomic_path` (or `write_atomically`, `atomic_directory`): the data goes to
a temporary name next to the target, then one rename puts it in place, so a reader, a crash or a kill never sees
half a file, and two processes writing the same file at once (DDP ranks) never share a temporary file. Every reader
of weights goes through `safe_torch_load` or `read_safetensors`. Every problem a user can cause is a UserError.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from perceiver_cli.errors import UserError, first_line

# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def refuse_existing(path: Path, force: bool) -> None:
    if Path(path).exists() and not force:
        raise UserError(f"{path} already exists", hint="pass --force to replace it")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` to write the file to; it replaces `path` when the block ends without
    an error and is removed otherwise. The temporary name keeps the suffix, for writers that choose the format by
    it (matplotlib)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write text (as UTF-8) or bytes to `path` through `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_directory(target: Path, force: bool) -> Iterator[Path]:
    """Yield an empty directory next to `target` to write into; on success it replaces `target` (which must not
    exist unless `force`), on failure it is removed. A crash never leaves a half-written `target`."""
    target = Path(target)
    refuse_existing(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        if target.exists():
            # A non-empty directory cannot be replaced in one rename: move it aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Reading weights
# ---------------------------------------------------------------------------------------------------------------


def safe_torch_load(path: Path, what: str = "checkpoint"):
    """`torch.load` that never runs code: tensors and plain data only. Every failure is a UserError."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt file can make the unpickler raise almost anything
        # Code runs from a pickle through a GLOBAL (a callable it names): that is what torch's safe loader refused.
        if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in str(err):
            raise UserError(
                f"refusing to load {path}: it holds pickled Python objects, which could run code when loaded"
                f"{_unsupported_global(err)}",
                hint="only files of tensors and plain data load; re-save the weights with perceiver or safetensors",
            ) from None
        raise UserError(f"cannot read {what} {path}: the file is truncated or not a PyTorch {what}") from None


def read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a truncated or foreign file is a UserError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read {path}: {first_line(err)} (truncated or not a safetensors file?)") from None


def write_safetensors_file(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """A safetensors file, atomically. safetensors stores each tensor once and densely: no views into shared
    storage, so each tensor is copied to a contiguous one of its own first."""
    from safetensors.torch import save_file

    dense = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(dense, str(tmp), metadata)


def _unsupported_global(err: Exception) -> str:
    """The callable torch refused to unpickle, e.g. " (posix.system)"."""
    import re

    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f" ({match.group(1)})" if match else ""
