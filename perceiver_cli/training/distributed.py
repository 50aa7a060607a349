"""The Lightning strategy for `[trainer] strategy`: "auto" and "ddp" are Lightning's own; "fsdp" is Lightning's
FSDPStrategy set up for our models. And what keeps a multi-process run from hanging: the collective watchdog.

FSDP shards each attention layer (cross- or self-attention with its MLP, in both model kinds) as one unit, so a
device holds the full weights of one layer at a time; `[trainer.fsdp] activation_checkpointing` recomputes those
layers' activations in the backward pass instead of keeping them. Checkpoints are consolidated into one file
("full" state dict, written by rank 0) that resumes on any number of processes and that
`perceiver_cli.checkpoints.load_model` reads like any other.

The watchdog: the ranks of a run meet in collectives (the gradient all-reduce of every step, barriers around
checkpoints, the validation loss); a rank that died or stopped would leave the others waiting there forever. Every
collective of the training therefore has a deadline, `[trainer] collective_timeout` (the process group's timeout:
torch ends a collective that has not completed by then with an error), and `CollectiveWatch` turns that error into
one line naming what was waited for and the last completed step. Setting up waits longer (JOIN_TIMEOUT): the ranks
start at different times, and under torchrun or srun the others wait for rank 0 to prepare the data. A rank that
was killed closes its connections, so the others fail at their next collective, at once. `watch_ranks` replaces
Lightning's watcher of the ranks it starts, which SIGKILLs rank 0 as soon as another rank ends badly, before rank 0
could say why or finish a checkpoint.

The private Lightning and torch attributes this needs are used through `lightning_compat`.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
from torch import nn

from perceiver_cli.errors import UserError
from perceiver_cli.models.layers import CrossAttentionLayer, SelfAttentionLayer
from perceiver_cli.models.lightning import NonFiniteLossError
from perceiver_cli.training.lightning_compat import (
    failed_collective,
    is_torch_frame,
    observe_launched_ranks,
    set_collective_timeout,
)

if TYPE_CHECKING:
    from perceiver_cli.config import RunConfig

SHARDED_LAYERS: frozenset[type[nn.Module]] = frozenset({CrossAttentionLayer, SelfAttentionLayer})
JOIN_TIMEOUT = timedelta(minutes=30)  # Lightning's default process-group timeout


def build_strategy(cfg: RunConfig):
    """The Trainer's `strategy` argument: a DDPStrategy or FSDPStrategy with the collective timeout, or "auto" for
    one process."""
    t = cfg.trainer
    timeout = max(JOIN_TIMEOUT, timedelta(seconds=t.collective_timeout))  # until training starts: see CollectiveWatch
    several = (isinstance(t.devices, int) and t.devices > 1) or t.num_nodes > 1
    if t.strategy == "ddp" or (t.strategy == "auto" and several):  # what Lightning's "auto" picks for several
        return DDPStrategy(timeout=timeout)
    if t.strategy != "fsdp":
        return t.strategy
    if t.accelerator == "auto" and not torch.cuda.is_available():
        raise UserError('strategy "fsdp" needs CUDA GPUs and this machine has none', hint='use "ddp" on the CPU')
    from perceiver_cli.config import FSDPSection

    fsdp = t.fsdp or FSDPSection()
    options = {}
    if fsdp.sharding == "hybrid_shard":
        # Shard within a node, replicate across nodes (Lightning turns the pair into a device mesh).
        options["device_mesh"] = (t.num_nodes, t.devices)
    return FSDPStrategy(
        auto_wrap_policy=set(SHARDED_LAYERS),
        activation_checkpointing_policy=set(SHARDED_LAYERS) if fsdp.activation_checkpointing else None,
        sharding_strategy=fsdp.sharding.upper(),
        state_dict_type="full",
        timeout=timeout,
        **options,
    )


def gradient_clip_val(cfg: RunConfig) -> float | None:
    """What the Trainer clips: nothing under FSDP, where ShardedGradientClipping does (Lightning cannot)."""
    return None if cfg.trainer.strategy == "fsdp" else cfg.trainer.gradient_clip_val


def strategy_callbacks(cfg: RunConfig) -> list[pl.Callback]:
    return [ShardedGradientClipping(cfg.trainer.gradient_clip_val)] if cfg.trainer.strategy == "fsdp" else []


class ShardedGradientClipping(pl.Callback):
    """Gradient clipping by norm under FSDP, which Lightning does not offer: each rank holds a shard of the
    gradients, so only the root FSDP module can compute their norm, over all ranks. That one global norm also tells
    every rank at once that a gradient became NaN or infinite; a rank stopping on its own shard would leave the
    others waiting forever in the next collective. Without a clip value the norm is still computed, for the check."""

    def __init__(self, max_norm: float | None):
        self.max_norm = max_norm

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        norm = trainer.strategy.model.clip_grad_norm_(self.max_norm or math.inf)
        if not torch.isfinite(norm):
            raise NonFiniteLossError("gradient", trainer.global_step)


# ---------------------------------------------------------------------------------------------------------------
# The collective watchdog
# ---------------------------------------------------------------------------------------------------------------

# How torch reports a collective that cannot complete: gloo's and NCCL's timeouts, the TCP store's wait for ranks to
# join, and a peer that is gone.
COLLECTIVE_FAILURES = ("Timed out waiting", "Watchdog caught collective operation timeout", "clients joined",
                       "Connection closed by peer", "Connection reset by peer")


class CollectiveWatch(pl.Callback):
    """Knows what this rank was doing when a collective failed: the stage of the run and the last completed step.

    The traceback names Python-level collectives (torch.distributed.broadcast, barrier, ...); the gradient
    all-reduce runs inside loss.backward, in DDP's C++ hooks, so the stage names that one."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.waited = max(JOIN_TIMEOUT.total_seconds(), timeout)  # the deadline in force
        self.stage = "setting up (every rank joins the process group; rank 0 prepares the data first)"
        self.completed = 0  # the last completed optimizer step

    def on_train_start(self, trainer, pl_module) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            set_collective_timeout(self.timeout)
            self.waited = self.timeout
        self.completed = trainer.global_step
        self.stage = "starting to train"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stage = f"step {trainer.global_step + 1}"

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.stage = f"the gradient all-reduce of step {trainer.global_step + 1} (in loss.backward)"

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.stage = f"the optimizer step of step {trainer.global_step + 1}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.completed = trainer.global_step
        self.stage = f"the end of step {trainer.global_step} (checkpoints, the stop check)"

    def on_validation_start(self, trainer, pl_module) -> None:
        self.stage = f"validation after step {trainer.global_step} (its loss is averaged over the ranks)"

    def on_validation_end(self, trainer, pl_module) -> None:
        self.stage = f"the end of validation after step {trainer.global_step} (rank 0 writes the sample, checkpoints)"

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.stage = f"saving the checkpoint of step {trainer.global_step} (every rank waits for rank 0 to write it)"

    def describe(self, err: BaseException, rank: int) -> str | None:
        """One line on a failed collective, or None when `err` is not one."""
        text = str(err)
        reported = isinstance(err, RuntimeError) and any(marker in text for marker in COLLECTIVE_FAILURES)
        if not reported and not isinstance(err, getattr(torch.distributed, "DistError", ())):
            return None
        what = self.stage
        frames = traceback.extract_tb(err.__traceback__)
        collective = failed_collective(frames)
        if collective is not None:
            # Who called it: our code where it did (a training step, a callback), else Lightning.
            callers = [f for f in frames if not is_torch_frame(f)]
            ours = [f for f in callers if "perceiver_cli" in f.filename and "/training/run.py" not in f.filename
                    and "/commands/" not in f.filename and not f.filename.endswith("cli.py")
                    and f.name != "launch"]  # ObservedSubprocessLauncher.launch holds all of trainer.fit
            caller = (ours or callers or [collective])[-1]
            what = f"torch.distributed.{collective.name} (called from {caller.name}) during {self.stage}"
        if "Connection" in text:
            cause = f"another rank stopped (its connection closed) while rank {rank} waited for {what}"
        else:
            cause = f"rank {rank} waited more than {self.waited:g} s (trainer.collective_timeout) for {what}"
        return f"{cause}; the last completed step is {self.completed}"


def watch_ranks(trainer: pl.Trainer, timeout: float) -> None:
    """Where Lightning starts the other ranks of this machine, watch them with `_watch_ranks` instead of Lightning's
    watcher, which SIGKILLs this process within 5 s of another rank ending badly: that loses this rank's error
    message and can cut a checkpoint save short."""
    observe_launched_ranks(trainer.strategy, lambda procs: _watch_ranks(procs, timeout))


def _watch_ranks(procs: list[subprocess.Popen], timeout: float, period: float = 1.0, margin: float = 30.0) -> None:
    """Once another rank (`procs`: ranks 1, 2, ...) has ended badly, give this rank one collective timeout (plus a
    margin) to end by itself, then end it: its next collective fails at once if the rank died, or times out."""
    while True:
        time.sleep(period)
        ended = [(rank, p.poll()) for rank, p in enumerate(procs, start=1) if p.poll() is not None]
        if len(ended) == len(procs) and all(code == 0 for _, code in ended):
            return
        failed = [(rank, code) for rank, code in ended if code != 0]
        if failed:
            time.sleep(timeout + margin)
            rank, code = failed[0]
            print(f"error: rank {rank} ended with status {code} and rank 0 did not stop within "
                  f"{timeout + margin:g} s; ending it", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
