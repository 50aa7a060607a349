"""Which model a command runs: the one named by --model, else the most recent run of the command's task."""

import sys

from perceiver_cli.checkpoints import load_model
from perceiver_cli.errors import UserError
from perceiver_cli.models.saved_model import LoadedModel
from perceiver_cli.runs import latest_run


def choose_model(model: str | None, task: str | None, device: str = "cpu") -> LoadedModel:
    """Load `model` (a run directory, a checkpoint file or an exported model directory), refusing one of another
    task; without it, the most recent run of `task` (of either task if None) under runs/, named on stderr so the
    user knows what ran."""
    if model is None:
        run_dir = latest_run(task)
        print(f"using {run_dir} (most recent {task + ' ' if task else ''}run)", file=sys.stderr)
        model = str(run_dir)
    return load_model(model, task, device=device)


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
