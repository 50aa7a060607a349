"""Run directories: `runs/<name>/<version>/` holds the resolved preset, checkpoints, logs and plots of one run.

    runs/clm-small/version_0/
        config.toml             the resolved preset (what --resume and the inference commands read)
        checkpoints/last.ckpt   the latest state (weights, optimizer, scheduler, step) to resume from
        checkpoints/best.ckpt   the best by validation loss
        tensorboard/  csv/metrics.csv  loss.png  summary.json
"""

from __future__ import annotations

import os
from pathlib import Path

from perceiver_cli.errors import UserError


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write via a temporary file and a rename, so readers never see half a file, even after a crash."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def new_run_dir(runs_dir: Path, name: str) -> Path:
    """Create `runs_dir/name/version_N` with the next free N. `mkdir` is atomic, so two runs started at once never
    share a directory: the loser of a race takes the next number."""
    parent = runs_dir / name
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the run directory under {runs_dir}: {err.strerror}") from None
    taken = [int(p.name.removeprefix("version_")) for p in parent.glob("version_*") if p.name[8:].isdigit()]
    version = max(taken, default=-1) + 1
    while True:
        run_dir = parent / f"version_{version}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            version += 1


RUN_DIR_ENV = "PERCEIVER_RUN_DIR"  # set by rank 0 for the ranks Lightning launches after it


def process_rank() -> int:
    """This process's global rank in a multi-process run, from the launcher's environment (0 when alone)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def launched_run_dir(runs_dir: Path, name: str) -> Path | None:
    """The run directory every rank of a multi-process run shares, where the launch decides it:
    - ranks that Lightning starts from the `perceiver` command (strategy ddp) take the one rank 0 created;
    - under torchrun or SLURM, where every rank starts the command by itself, the job's id names it.
    None for a single process or rank 0 of a Lightning launch: that process creates a new version directory."""
    if process_rank() > 0 and RUN_DIR_ENV in os.environ:
        return Path(os.environ[RUN_DIR_ENV])
    world_size = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    job = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
    if world_size > 1 and job:
        run_dir = runs_dir / name / f"job-{job}"
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    return None


def resume_checkpoint(resume: str, runs_dir: Path, name: str) -> Path:
    """The checkpoint `--resume` means: `auto` is the newest version of this run name with a last checkpoint;
    otherwise a run directory or a checkpoint file."""
    if resume == "auto":
        candidates = sorted(
            (p for p in (runs_dir / name).glob("version_*/checkpoints/last.ckpt")),
            key=lambda p: int(p.parent.parent.name.removeprefix("version_")),
        )
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
