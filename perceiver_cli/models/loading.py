"""One saved model from a path, by its kind: an exported model directory (with config.json: ours, transformers' or the
perceiver-io library's), a .safetensors file or a checkpoint file. `checkpoints.load_model` (the commands) and the
Lightning wrappers' `params` both load through it; each adds only what its callers may pass besides (run
directories, hub names)."""

from __future__ import annotations

from pathlib import Path

from perceiver_cli.models.saved_files import load_checkpoint_file, load_safetensors_file
from perceiver_cli.models.saved_model import LoadedModel


def load_model_path(path: Path) -> LoadedModel:
    if path.is_dir():  # the caller has checked that it holds a config.json
        from perceiver_cli.models.huggingface import load_pretrained_directory

        return load_pretrained_directory(path)
    if path.suffix == ".safetensors":
        return load_safetensors_file(path)
    return load_checkpoint_file(path)
