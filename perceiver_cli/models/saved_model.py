"""The saved-model format: what a perceiver checkpoint or safetensors file carries besides its weights, and how
that description becomes a backend model again.

It sits below everything that reads or writes saved models (the Lightning wrappers write the description into
every checkpoint, `perceiver_cli.checkpoints` writes and loads files, the Hugging Face package converts
directories), so that none of them imports another to share it. The description is JSON-able, so a Lightning
checkpoint loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perceiver_cli.errors import UserError

TASK_NAMES = {"clm": "causal language model (Perceiver AR)", "mlm": "masked language model (Perceiver IO)"}
CHECKPOINT_KEY = "perceiver"  # our description inside a Lightning checkpoint and a safetensors header
FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    task: str  # "clm" or "mlm"
    model: Any  # the backend model, in eval mode
    config: Any  # its CausalLanguageModelConfig or MaskedLanguageModelConfig
    tokenizer: str  # tokenizer spec: "utf8" or a directory
    run_config: dict[str, Any] | None  # the resolved preset it was trained with, where known
    source: Path  # the file or directory it came from


def checkpoint_metadata(task: str, config: Any, run_config: dict[str, Any] | None, tokenizer: str) -> dict[str, Any]:
    """What a checkpoint carries besides weights, all JSON-able (so `weights_only` loading accepts it)."""
    return {
        "format_version": FORMAT_VERSION,
        "task": task,
        "model_config": config.to_dict(),
        "tokenizer": tokenizer,
        "run_config": run_config,
    }


def build_backend_model(task: str, model_config: dict[str, Any]):
    """Backend model (randomly initialised) and config from a task name and a config dict."""
    if task == "clm":
        from perceiver_cli.models.clm.model import CausalLanguageModel, CausalLanguageModelConfig

        config = CausalLanguageModelConfig.from_dict(model_config)
        return CausalLanguageModel(config), config
    if task == "mlm":
        from perceiver_cli.models.mlm.model import MaskedLanguageModel, MaskedLanguageModelConfig

        config = MaskedLanguageModelConfig.from_dict(model_config)
        return MaskedLanguageModel(config), config
    raise UserError(f"unknown task {task!r} in checkpoint metadata; expected 'clm' or 'mlm'")


def model_from_metadata(meta: Any, state_dict: dict[str, Any], source: Path) -> LoadedModel:
    """The model a saved description and its weights stand for; every mismatch is a UserError naming `source`."""
    try:
        task, model_config = meta["task"], meta["model_config"]
    except (KeyError, TypeError):
        raise UserError(f"{source} lacks the model description perceiver writes; was it saved by perceiver?") from None
    try:
        model, config = build_backend_model(task, model_config)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source}: invalid model config: {err}") from None
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0:3]
        raise UserError(
            f"{source}: the weights do not match the model its config describes ({' '.join(first)})",
            hint="the file may be corrupt or edited; use the checkpoint as written by perceiver",
        ) from None
    return LoadedModel(task, model, config, meta.get("tokenizer", "utf8"), meta.get("run_config"), source)
