"""Reading perceiver's own saved-model files: a Lightning checkpoint (.ckpt) or a safetensors file, each with the
model description of `saved_model` beside its weights.

Below every reader of saved models: `checkpoints.load_model` (every command, with run directories and Hugging Face
directories on top) and the Lightning wrappers' `params` (the weights a training run starts from). Nothing here
unpickles code: checkpoints load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path

from perceiver_cli.errors import UserError
from perceiver_cli.files import read_safetensors, safe_torch_load
from perceiver_cli.models.saved_model import CHECKPOINT_KEY, LoadedModel, model_from_metadata


def load_checkpoint_file(path: Path) -> LoadedModel:
    """The model of a Lightning checkpoint written by perceiver (its backend's weights are `model.*`)."""
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not a Lightning checkpoint (no state_dict)")
    prefix = "model."
    state_dict = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    return model_from_metadata(checkpoint.get(CHECKPOINT_KEY), state_dict, path)


def load_safetensors_file(path: Path) -> LoadedModel:
    """The model of a safetensors file written by perceiver (its description in the metadata)."""
    state_dict, metadata = read_safetensors(path)
    try:
        meta = json.loads(metadata[CHECKPOINT_KEY])
    except (KeyError, json.JSONDecodeError):
        raise UserError(f"{path} has no perceiver model description in its metadata") from None
    return model_from_metadata(meta, state_dict, path)
