"""Finding runs: which checkpoint a run directory stands for, the most recent run of a task, what `--resume`
means. Runs live in `runs/<name>/<version>/` (see `training.run_dir`, which creates them); only the standard
library is imported here.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from perceiver_cli.errors import UserError

RUNS_DIR = Path("runs")  # where `perceiver train` writes runs by default, relative to the working directory
TASKS = ("clm", "mlm")
TRAIN_PRESETS = {"clm": "clm-small", "mlm": "mlm-small"}


def run_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a run directory stands for: the best by validation loss, else the last."""
    for name in ("best.ckpt", "last.ckpt"):
        if (run_dir / "checkpoints" / name).is_file():
            return run_dir / "checkpoints" / name
    return None


def run_task(run_dir: Path) -> str | None:
    try:
        return tomllib.loads((run_dir / "config.toml").read_text())["model"]["task"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None


def find_latest_run(task: str, runs_dir: Path = RUNS_DIR) -> Path | None:
    """The most recently written run directory (runs/NAME/VERSION) of `task` that has a checkpoint."""
    candidates = []
    for run_dir in runs_dir.glob("*/*"):
        checkpoint = run_checkpoint(run_dir)
        if checkpoint is not None and run_task(run_dir) == task:
            candidates.append((checkpoint.stat().st_mtime, run_dir))
    return max(candidates)[1] if candidates else None


def latest_run(task: str | None, runs_dir: Path = RUNS_DIR) -> Path:
    """The most recent run of `task` (of either task if None), or a UserError that says how to make one."""
    from perceiver_cli.models.saved_model import TASK_NAMES

    tasks = [task] if task else list(TASKS)
    runs = [run for run in (find_latest_run(t, runs_dir) for t in tasks) if run is not None]
    if not runs:
        what = TASK_NAMES[task] if task else "model"
        how = " or ".join(f"`perceiver train --preset {TRAIN_PRESETS[t]}`" for t in tasks)
        raise UserError(f"no trained {what} found under {runs_dir}/", hint=f"train one with {how}, or pass --model")
    return max(runs, key=lambda run: run_checkpoint(run).stat().st_mtime)


def resume_checkpoint(resume: str, runs_dir: Path, name: str) -> Path:
    """The checkpoint `--resume` means: `auto` is the most recently written last checkpoint of this run name (in a
    version_N, torchrun-* or slurm-* directory); otherwise a run directory or a checkpoint file."""
    if resume == "auto":
        candidates = sorted((runs_dir / name).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise UserError(
                f"--resume auto: no checkpoint to resume under {runs_dir / name}",
                hint="start the run without --resume first, or pass a checkpoint path",
            )
        return candidates[-1]
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise UserError(f"--resume {resume}: no checkpoint at {path}", hint="use --resume auto or a .ckpt path")
    return path


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (checkpoints live in `<run>/checkpoints/`)."""
    return checkpoint.parent.parent
