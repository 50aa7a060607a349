"""Perceiver's own model files, and `load_model`, the one loader every command uses.

`load_model` takes a run directory, a Lightning checkpoint, a safetensors file or a Hugging Face model directory and
returns the backend model with its description (`models.saved_model.LoadedModel`). Nothing here unpickles code:
checkpoints load with `torch.load(weights_only=True)` and safetensors files hold tensors and strings only. Every
problem a user can cause (a missing path, the wrong task, a truncated file) is a UserError that says what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from perceiver_cli.errors import UserError
from perceiver_cli.files import atomic_path, write_safetensors_file
from perceiver_cli.models.loading import load_model_path
from perceiver_cli.models.saved_files import load_checkpoint_file
from perceiver_cli.models.saved_model import CHECKPOINT_KEY, TASK_NAMES, LoadedModel, checkpoint_metadata
from perceiver_cli.runs import run_checkpoint

# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def write_checkpoint(
    path: Path, task: str, model: Any, config: Any, tokenizer: str = "utf8", run_config: dict[str, Any] | None = None
) -> Path:
    """Write a model as a checkpoint that `load_model` (and so every command) accepts, atomically."""
    import torch

    state = {
        "state_dict": {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()},
        CHECKPOINT_KEY: checkpoint_metadata(task, config, run_config, tokenizer),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def write_safetensors(
    path: Path, task: str, model: Any, config: Any, tokenizer: str = "utf8", run_config: dict[str, Any] | None = None
) -> Path:
    """Write a model's weights as a safetensors file with its description in the metadata, atomically."""
    metadata = {CHECKPOINT_KEY: json.dumps(checkpoint_metadata(task, config, run_config, tokenizer))}
    write_safetensors_file(path, model.state_dict(), metadata)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def load_model(path: str | Path, task: str | None = None, device: str = "cpu") -> LoadedModel:
    """Load a run directory, a Lightning checkpoint (.ckpt), a safetensors file or an exported model directory.

    With `task`, a model of the other task is refused with a message naming both.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"model not found: {path}", hint="pass a run directory, a .ckpt or .safetensors file")
    if path.is_dir():
        if (path / "config.json").is_file():
            loaded = load_model_path(path)
        else:
            checkpoint = run_checkpoint(path)
            if checkpoint is None:
                raise UserError(
                    f"{path} holds no checkpoint (checkpoints/best.ckpt or checkpoints/last.ckpt) and no config.json",
                    hint="pass a run directory written by `perceiver train`, a checkpoint file or an exported model",
                )
            loaded = load_checkpoint_file(checkpoint)
    else:
        loaded = load_model_path(path)

    if task is not None and loaded.task != task:
        raise UserError(
            f"{path} is a {TASK_NAMES[loaded.task]}, but this command needs a {TASK_NAMES[task]}",
            hint="pick a model of the right task with --model",
        )
    loaded.model.to(device).eval()
    return loaded
