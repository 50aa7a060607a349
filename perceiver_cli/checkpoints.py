"""The one checkpoint loader: run directories, Lightning checkpoints and safetensors files become backend models.

Nothing here unpickles code: Lightning checkpoints load with `torch.load(weights_only=True)` and safetensors files
hold tensors and strings only. Every problem a user can cause (a missing path, the wrong task, a truncated file)
is a UserError that says what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perceiver_cli.errors import UserError, first_line

TASK_NAMES = {"clm": "causal language model (Perceiver AR)", "mlm": "masked language model (Perceiver IO)"}
CHECKPOINT_KEY = "perceiver"  # our metadata inside a Lightning checkpoint and a safetensors header
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
        from perceiver_cli.models.clm import CausalLanguageModel, CausalLanguageModelConfig

        config = CausalLanguageModelConfig.from_dict(model_config)
        return CausalLanguageModel(config), config
    if task == "mlm":
        from perceiver_cli.models.mlm import MaskedLanguageModel, MaskedLanguageModelConfig

        config = MaskedLanguageModelConfig.from_dict(model_config)
        return MaskedLanguageModel(config), config
    raise UserError(f"unknown task {task!r} in checkpoint metadata; expected 'clm' or 'mlm'")


def write_checkpoint(
    path: Path, task: str, model: Any, config: Any, tokenizer: str = "utf8", run_config: dict[str, Any] | None = None
) -> Path:
    """Write a model as a checkpoint that `load_model` (and so every command) accepts, atomically: a crash while
    writing never leaves a half-written file under `path`."""
    import torch

    state = {
        "state_dict": {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()},
        CHECKPOINT_KEY: checkpoint_metadata(task, config, run_config, tokenizer),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def write_safetensors(
    path: Path, task: str, model: Any, config: Any, tokenizer: str = "utf8", run_config: dict[str, Any] | None = None
) -> Path:
    """Write a model's weights as a safetensors file with its description in the metadata, the format
    `_load_safetensors` reads; atomically, like `write_checkpoint`."""
    from safetensors.torch import save_file

    # safetensors stores each tensor once and densely: no views into shared storage.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {CHECKPOINT_KEY: json.dumps(checkpoint_metadata(task, config, run_config, tokenizer))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------------------------


def run_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a run directory stands for: the best by validation loss, else the last."""
    for name in ("best.ckpt", "last.ckpt"):
        if (run_dir / "checkpoints" / name).is_file():
            return run_dir / "checkpoints" / name
    return None


def run_task(run_dir: Path) -> str | None:
    import tomllib

    try:
        return tomllib.loads((run_dir / "config.toml").read_text())["model"]["task"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None


def find_latest_run(task: str, runs_dir: Path = Path("runs")) -> Path | None:
    """The most recently written run directory (runs/NAME/VERSION) of `task` that has a checkpoint."""
    candidates = []
    for run_dir in runs_dir.glob("*/*"):
        checkpoint = run_checkpoint(run_dir)
        if checkpoint is not None and run_task(run_dir) == task:
            candidates.append((checkpoint.stat().st_mtime, run_dir))
    return max(candidates)[1] if candidates else None


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
            from perceiver_cli.models.huggingface import load_pretrained_directory

            loaded = load_pretrained_directory(path)
        else:
            checkpoint = run_checkpoint(path)
            if checkpoint is None:
                raise UserError(
                    f"{path} holds no checkpoint (checkpoints/best.ckpt or checkpoints/last.ckpt) and no config.json",
                    hint="pass a run directory written by `perceiver train`, a checkpoint file or an exported model",
                )
            loaded = _load_lightning_checkpoint(checkpoint)
    elif path.suffix == ".safetensors":
        loaded = _load_safetensors(path)
    else:
        loaded = _load_lightning_checkpoint(path)

    if task is not None and loaded.task != task:
        raise UserError(
            f"{path} is a {TASK_NAMES[loaded.task]}, but this command needs a {TASK_NAMES[task]}",
            hint="pick a model of the right task with --model",
        )
    loaded.model.to(device).eval()
    return loaded


def _from_metadata(meta: dict[str, Any], state_dict: dict[str, Any], source: Path) -> LoadedModel:
    from perceiver_cli.models.attention import fused_state_dict

    try:
        task, model_config = meta["task"], meta["model_config"]
    except (KeyError, TypeError):
        raise UserError(f"{source} lacks the model description perceiver writes; was it saved by perceiver?") from None
    try:
        model, config = build_backend_model(task, model_config)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source}: invalid model config: {err}") from None
    try:
        model.load_state_dict(fused_state_dict(model, state_dict))  # older checkpoints: separate q/k/v
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0:3]
        raise UserError(
            f"{source}: the weights do not match the model its config describes ({' '.join(first)})",
            hint="the file may be corrupt or edited; use the checkpoint as written by perceiver",
        ) from None
    return LoadedModel(task, model, config, meta.get("tokenizer", "utf8"), meta.get("run_config"), source)


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


def _load_lightning_checkpoint(path: Path) -> LoadedModel:
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not a Lightning checkpoint (no state_dict)")
    prefix = "model."
    state_dict = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    return _from_metadata(checkpoint.get(CHECKPOINT_KEY), state_dict, path)


def _load_safetensors(path: Path) -> LoadedModel:
    state_dict, metadata = read_safetensors(path)
    try:
        meta = json.loads(metadata[CHECKPOINT_KEY])
    except (KeyError, json.JSONDecodeError):
        raise UserError(f"{path} has no perceiver model description in its metadata") from None
    return _from_metadata(meta, state_dict, path)


def _unsupported_global(err: Exception) -> str:
    """The callable torch refused to unpickle, e.g. " (posix.system)"."""
    import re

    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f" ({match.group(1)})" if match else ""

