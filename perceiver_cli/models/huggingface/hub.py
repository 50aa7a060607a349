"""Hugging Face Hub model names (such as krasserm/perceiver-io-mlm) as local model directories.

A name is downloaded when the Hub answers for it within seconds, else read from the local Hugging Face cache: an
unreachable Hub fails fast with a message that says what to do, as hub datasets do (`data.sources`).
"""

from __future__ import annotations

from pathlib import Path

from perceiver_cli.data.sources import hub_status
from perceiver_cli.errors import UserError

# What a model directory needs to load here (config, weights, tokenizer), and nothing more.
MODEL_FILES = ["*.json", "*.safetensors", "pytorch_model*.bin", "*.txt", "*.model"]


def hub_model_directory(name: str) -> Path:
    """The local directory of Hub model `name` ("owner/model"): downloaded if the Hub answers, else from the cache."""
    from huggingface_hub import snapshot_download

    if name.count("/") != 1 or name.startswith((".", "/", "~")) or name.endswith((".ckpt", ".safetensors")):
        raise UserError(f"model not found: {name}", hint="pass a checkpoint, a safetensors file or a model directory")
    status = hub_status(name, repo_type="model")
    try:
        return Path(snapshot_download(name, allow_patterns=MODEL_FILES, local_files_only=status != "online"))
    except Exception as err:  # huggingface_hub raises many kinds: not cached, not found, HTTP and network errors
        reason = {
            "online": f"{type(err).__name__}: {' '.join(str(err).split())[:200]}",
            "missing": "no such model on the Hugging Face Hub (or it needs a login), and no local copy",
            "unreachable": "no such path, and the Hugging Face Hub cannot be reached and holds no local copy",
        }[status]
        raise UserError(
            f"cannot load model {name}: {reason}",
            hint="pass a checkpoint, a safetensors file or an exported model directory, or download the model into "
            "the local Hugging Face cache on a machine with network access (hf download NAME)",
        ) from None
