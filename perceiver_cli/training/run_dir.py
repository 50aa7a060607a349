"""Run directories: `runs/<name>/<version>/` holds the resolved preset, checkpoints, logs and plots of one run.

    runs/clm-small/version_0/
        config.toml             the resolved preset (what --resume and the inference commands read)
        checkpoints/last.ckpt   the latest state (weights, optimizer, scheduler, step) to resume from
        checkpoints/best.ckpt   the best by validation loss
        tensorboard/  csv/metrics.csv  loss.png  summary.json

A run that torchrun or srun starts is named after its job instead: `torchrun-<rendezvous id>`, `slurm-<job>.<step>`.
"""

from __future__ import annotations

import os
from pathlib import Path

from perceiver_cli.errors import UserError
from perceiver_cli.runs import run_dir_of
from perceiver_cli.training.launch import Launch, detect_launch


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
    """This process's global rank in a multi-process run (0 when alone), as Lightning will number it."""
    return detect_launch().rank


def run_dir_for(runs_dir: Path, name: str, checkpoint: Path | None, launch: Launch | None = None) -> Path:
    """The run directory of this process, the same on every rank of a multi-process run:
    - the ranks that Lightning starts from the `perceiver` command take the one rank 0 chose;
    - a resumed run goes on in its checkpoint's directory (every rank resolves the same checkpoint);
    - a new run under torchrun or srun, where every rank starts by itself, gets the directory its job names
      (`torchrun-<rendezvous id>` or `slurm-<job>.<step>`);
    - otherwise a new `version_N`.
    `launch` is who started this process (read from the environment if not given)."""
    launch = launch or detect_launch()
    if not launch.external and launch.rank > 0 and RUN_DIR_ENV in os.environ:
        return Path(os.environ[RUN_DIR_ENV])
    if checkpoint is not None:
        return run_dir_of(checkpoint)
    if launch.world_size == 1:
        return new_run_dir(runs_dir, name)
    if launch.job is None:
        raise UserError(
            "torchrun was started without a rendezvous id, which names the run directory all ranks share",
            hint="pass --rdzv-id=<an id unique to this run> (the same on every node), or --standalone on one node",
        )
    run_dir = runs_dir / name / launch.job
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir
