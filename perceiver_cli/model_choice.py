"""Which model a command runs: the one named by --model, else the most recent run of the command's task."""

import sys
from pathlib import Path

from perceiver_cli.checkpoints import TASK_NAMES, LoadedModel, find_latest_run, load_model, run_checkpoint
from perceiver_cli.errors import UserError

RUNS_DIR = Path("runs")
TRAIN_PRESETS = {"clm": "clm-small", "mlm": "mlm-small"}


def choose_model(model: str | None, task: str | None, device: str = "cpu") -> LoadedModel:
    """Load `model` (a run directory, a checkpoint file or an exported model directory), refusing one of another
    task; without it, the most recent run of `task` (of either task if None) under runs/, named on stderr so the
    user knows what ran."""
    if model is None:
        run_dir = _latest_run(task)
        print(f"using {run_dir} (most recent {task + ' ' if task else ''}run)", file=sys.stderr)
        model = str(run_dir)
    return load_model(model, task, device=device)


def _latest_run(task: str | None) -> Path:
    tasks = [task] if task else list(TASK_NAMES)
    runs = [run for run in (find_latest_run(t, RUNS_DIR) for t in tasks) if run is not None]
    if not runs:
        what = TASK_NAMES[task] if task else "model"
        how = " or ".join(f"`perceiver train --preset {TRAIN_PRESETS[t]}`" for t in tasks)
        raise UserError(f"no trained {what} found under {RUNS_DIR}/", hint=f"train one with {how}, or pass --model")
    return max(runs, key=lambda run: run_checkpoint(run).stat().st_mtime)


def resolve_device(device: str) -> str:
    """Check a --device value ("cpu", "cuda", "cuda:1", "mps") against what this machine has."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device {device!r}: use cpu, cuda, cuda:N or mps")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA GPU is available: use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UserError(f"--device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device} asked for, but MPS is not available: use --device cpu")
    return device
