"""Every private attribute of Lightning and torch that the training relies on, in one module.

Neither library promises anything about its private names, and a patch of one that has gone fails silently (an
assignment to a missing attribute only adds it) or late (in a multi-process run on a cluster). So each use lives
here, with why it is needed and what it replaces, and `RELIED_ON` lists the names; tests/test_lightning_compat.py
fails when one of them disappears or stops working as used here. Checked on the versions of `CHECKED_ON`: after an
upgrade of either library, run that test first, and compare `ObservedSubprocessLauncher.launch` with the launch()
of Lightning's `_SubprocessScriptLauncher`, which it copies.

The uses:
- `skip_sigterm_broadcast` (callbacks.StopOnSignal): Lightning's per-step broadcast of rank 0's SIGTERM flag;
- `ObservedSubprocessLauncher` and `observe_launched_ranks` (distributed.watch_ranks): Lightning's launcher of the
  ranks of this machine, with our watcher of those ranks instead of Lightning's;
- `set_collective_timeout` (distributed.CollectiveWatch): the timeout of the process group that exists;
- `failed_collective` and `is_torch_frame` (distributed.CollectiveWatch.describe): which frames of a traceback are
  torch's collectives and torch's own.
"""

from __future__ import annotations

import os
import subprocess
import threading
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed.distributed_c10d as c10d
from lightning_fabric.utilities.distributed import _set_num_threads_if_needed
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

CHECKED_ON = {"pytorch-lightning": "2.6.6", "torch": "2.13.0"}

# (module, attribute path) -> what relies on it. The test imports each and resolves the path.
RELIED_ON: dict[tuple[str, str], str] = {
    ("pytorch_lightning.loops.training_epoch_loop", "_TrainingEpochLoop._broadcast_sigterm_tensor"):
        "skip_sigterm_broadcast",
    ("pytorch_lightning.strategies.launchers", "_SubprocessScriptLauncher"): "ObservedSubprocessLauncher (its base)",
    ("pytorch_lightning.strategies.launchers", "_SubprocessScriptLauncher._call_children_scripts"):
        "ObservedSubprocessLauncher.launch",
    ("lightning_fabric.utilities.distributed", "_set_num_threads_if_needed"): "ObservedSubprocessLauncher.launch",
    ("pytorch_lightning.strategies", "Strategy.launcher"): "observe_launched_ranks (reads it; sets `_launcher`)",
    ("torch.distributed.distributed_c10d", "_set_pg_timeout"): "set_collective_timeout",
}
# Instance attributes, set by constructors (the test checks them on instances): class -> attributes.
INSTANCE_ATTRIBUTES = {
    "pytorch_lightning.strategies.launchers._SubprocessScriptLauncher":
        ("cluster_environment", "num_processes", "num_nodes", "procs"),
    "pytorch_lightning.strategies.Strategy": ("_launcher",),
}


def _require(owner: Any, attribute: str) -> None:
    """Fail loudly where a patch would otherwise add an attribute that the library no longer reads."""
    if not hasattr(owner, attribute):
        versions = ", ".join(f"{name} {version}" for name, version in CHECKED_ON.items())
        raise RuntimeError(
            f"{type(owner).__name__}.{attribute} is gone: perceiver_cli.training.lightning_compat was checked on "
            f"{versions}; see tests/test_lightning_compat.py"
        )


# ---------------------------------------------------------------------------------------------------------------
# Stopping on a signal
# ---------------------------------------------------------------------------------------------------------------


def skip_sigterm_broadcast(trainer) -> None:
    """Turn off the broadcast of rank 0's SIGTERM flag that Lightning's training epoch loop runs before every step
    with several ranks (`_TrainingEpochLoop._broadcast_sigterm_tensor`). It swallows errors, so a dead rank costs a
    second collective timeout, and `callbacks.StopOnSignal` does its job with one all-reduce at the end of each step.
    Lightning has no setting for it."""
    loop = trainer.fit_loop.epoch_loop
    _require(loop, "_broadcast_sigterm_tensor")
    loop._broadcast_sigterm_tensor = lambda: None


# ---------------------------------------------------------------------------------------------------------------
# Watching the ranks this process starts
# ---------------------------------------------------------------------------------------------------------------

RankWatcher = Callable[[list[subprocess.Popen]], None]  # runs in a daemon thread, given the started processes


class ObservedSubprocessLauncher(_SubprocessScriptLauncher):
    """Lightning's launcher of the other ranks of this machine (it re-runs the command with LOCAL_RANK set), with
    `watch` in place of Lightning's observer of those processes (`_launch_process_observer`, which SIGKILLs this
    process within 5 s of another rank ending badly). Lightning offers no hook for the observer, so `launch` is its
    own launch() with that one call replaced."""

    def __init__(self, launcher: _SubprocessScriptLauncher, watch: RankWatcher):
        super().__init__(launcher.cluster_environment, launcher.num_processes, launcher.num_nodes)
        self.watch = watch

    def launch(self, function, *args, trainer=None, **kwargs):
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            threading.Thread(target=self.watch, args=(self.procs,), daemon=True, name="rank-watcher").start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


def observe_launched_ranks(strategy, watch: RankWatcher) -> bool:
    """Where Lightning will start the other ranks of this machine itself (its `_SubprocessScriptLauncher`), start
    them with `ObservedSubprocessLauncher` and `watch` instead; whether it did. `Strategy.launcher` has no setter,
    so this sets the attribute behind it."""
    launcher = strategy.launcher
    if type(launcher) is not _SubprocessScriptLauncher:
        return False
    _require(strategy, "_launcher")
    strategy._launcher = ObservedSubprocessLauncher(launcher, watch)
    return True


# ---------------------------------------------------------------------------------------------------------------
# The process group's timeout, and the frames of a failed collective
# ---------------------------------------------------------------------------------------------------------------


def set_collective_timeout(seconds: float) -> None:
    """Set the timeout of the default process group, which exists already: setting up may wait longer than one
    collective of the training may (see `distributed.CollectiveWatch`). torch offers only the private
    `_set_pg_timeout` to change it after the group was made."""
    c10d._set_pg_timeout(timedelta(seconds=seconds))


_C10D_FILE = os.path.realpath(c10d.__file__)
_TORCH_DIR = os.path.dirname(os.path.realpath(torch.__file__)) + os.sep


def failed_collective(frames: traceback.StackSummary) -> traceback.FrameSummary | None:
    """The innermost frame of a traceback in torch.distributed's collectives (broadcast, barrier, all_reduce, ...:
    the module `torch.distributed.distributed_c10d`), or None."""
    return next((f for f in reversed(frames) if os.path.realpath(f.filename) == _C10D_FILE), None)


def is_torch_frame(frame: traceback.FrameSummary) -> bool:
    """Whether a traceback frame is torch's own code."""
    return os.path.realpath(frame.filename).startswith(_TORCH_DIR)
