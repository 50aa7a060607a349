"""The files of a Hugging Face model directory: config.json, the weights, the tokenizer (written inside
`files.atomic_directory`, so a directory appears complete or not at all).

Every problem a user can cause (a missing or truncated file, a config without model_type, weights that would run
code when unpickled) is a UserError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from perceiver_cli.data.tokenizer import BYTE_TOKENIZER_MARK
from perceiver_cli.errors import UserError, first_line
from perceiver_cli.files import read_safetensors, safe_torch_load, write_safetensors_file

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
PYTORCH_FILE = "pytorch_model.bin"
INDEX_SUFFIX = ".index.json"  # sharded weights: model.safetensors.index.json names the shard of each tensor
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")  # save_pretrained writes at least one of them

# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def read_config(directory: Path) -> dict[str, Any]:
    """config.json as a dict; it must name its model_type."""
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {first_line(err)}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{path} has no model_type, so the kind of model is unknown", hint="is it a model's config?")
    return config


def read_weights(directory: Path) -> dict[str, Any]:
    """All tensors of the directory: model.safetensors or pytorch_model.bin, whole or sharded."""
    for name in (SAFETENSORS_FILE, PYTORCH_FILE):
        if (directory / name).is_file():
            return _read_weights_file(directory / name)
        if (directory / (name + INDEX_SUFFIX)).is_file():
            return _read_sharded(directory / (name + INDEX_SUFFIX))
    raise UserError(f"{directory} holds no weights ({SAFETENSORS_FILE} or {PYTORCH_FILE})")


def _read_sharded(index_path: Path) -> dict[str, Any]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"cannot read the shard index {index_path}: {first_line(err)}") from None
    tensors: dict[str, Any] = {}
    for shard in shards:
        tensors.update(_read_weights_file(index_path.parent / shard))
    return tensors


def _read_weights_file(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    state = safe_torch_load(path, what="weights file")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict (a mapping of names to tensors)")
    return state


def tokenizer_spec(directory: Path) -> str | None:
    """The tokenizer a directory holds, as a `load_tokenizer` spec: "utf8" for a saved PerceiverTokenizer (the
    UTF-8 byte tokenizer, which needs no files), the directory itself for any other tokenizer, None without one."""
    config_path = directory / TOKENIZER_FILES[0]
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            tokenizer_class, mark = config.get("tokenizer_class"), config.get(BYTE_TOKENIZER_MARK)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise UserError(f"cannot read {config_path}: {first_line(err)}") from None
        if tokenizer_class == "PerceiverTokenizer" or mark == "utf8":
            return "utf8"
    if any((directory / name).is_file() for name in TOKENIZER_FILES):
        return str(directory.resolve())
    return None


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def write_weights(path: Path, tensors: dict[str, Any]) -> None:
    """model.safetensors as transformers writes it (its metadata says the tensors are PyTorch's)."""
    write_safetensors_file(path, tensors, {"format": "pt"})


def save_tokenizer(spec: str, directory: Path, padding_side: str, model_max_length: int | None = None):
    """Write the tokenizer files of `spec` (see `load_tokenizer`) into `directory`; return the tokenizer."""
    from perceiver_cli.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(spec, padding_side=padding_side)
    # save_pretrained writes the construction arguments: padding_side, set after construction, must join them.
    tokenizer.init_kwargs["padding_side"] = padding_side
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def save_causal_lm_tokenizer(spec: str, directory: Path, model_max_length: int):
    """Write the tokenizer of an exported causal LM (see `causal_lm_tokenizer`) into `directory`; return it."""
    from perceiver_cli.data.tokenizer import causal_lm_tokenizer

    tokenizer = causal_lm_tokenizer(spec, model_max_length)
    tokenizer.save_pretrained(str(directory))
    return tokenizer

