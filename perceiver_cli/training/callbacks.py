"""Lightning callbacks of a `perceiver train` run: throughput, the final summary and loss plot, and atomic checkpoint
files (the progress display: progress.py). Only rank 0 prints or writes."""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table

from perceiver_cli.files import atomic_path, write_atomically
from perceiver_cli.training.lightning_compat import skip_sigterm_broadcast


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written atomically: a kill during saving leaves the previous `last.ckpt` intact instead of a
    truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class StopRequested(KeyboardInterrupt):
    """A clean stop that every rank agreed on at the end of the same step (see StopOnSignal). A KeyboardInterrupt,
    so that Lightning shuts down as on Ctrl-C."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class StopOnSignal(pl.Callback):
    """SIGTERM and Ctrl-C (SIGINT) stop the run at the end of the current step, saving it (see LastCheckpoint).

    The signal handler only takes note: the ranks learn of it together, in one all-reduce at the end of every step,
    and all stop after the same step. Stopping where the signal arrives cannot work with several ranks: the other
    ranks would wait in the step's collectives for the stopped one. (Lightning's own SIGTERM handler runs a broadcast
    inside the handler, at whatever point each rank is, and its per-step broadcast of rank 0's flag swallows errors,
    so a dead rank costs a second timeout; both are replaced here.) A second Ctrl-C stops at once, without saving
    in a multi-process run. Only rank 0 needs the signal: the `perceiver` command's ranks hear of it from it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None  # the name of the signal received, until the ranks act on it
        self._checked_at = 0  # the step of the last check

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning has installed its handlers (and before it restores the original ones when fit ends).
        for signum in self.SIGNALS:
            signal.signal(signum, self._note)
        skip_sigterm_broadcast(trainer)  # see the class docstring
        self._checked_at = trainer.global_step

    def _note(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.requested = signal.Signals(signum).name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._checked_at:
            return  # within gradient accumulation: stop after the optimizer step, with nothing half done
        self._checked_at = trainer.global_step
        requested = torch.tensor([0 if self.requested is None else signal.Signals[self.requested].value])
        if trainer.world_size > 1:
            torch.distributed.all_reduce(requested, op=torch.distributed.ReduceOp.MAX)
        if requested.item():
            raise StopRequested(signal.Signals(int(requested.item())).name)


class LastCheckpoint(pl.Callback):
    """`last.ckpt` after the final step and on a clean stop (SIGTERM, Ctrl-C), so that `--resume auto` continues from
    the very last step (between them, the `last` ModelCheckpoint saves it at every validation). Other exceptions save
    nothing: a failure (a NaN loss, a rank lost) must not overwrite the last good checkpoint."""

    def __init__(self, last: Path):
        self.last = last
        self.saved_at: int | None = None
        self.interrupted_at: int | None = None
        self.signal_name = "SIGINT"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Saved inside the step loop, like ModelCheckpoint's step checkpoints: a checkpoint written after the loop
        # has ended records its progress differently, and a resumed run would number its steps one off.
        if trainer.global_step == trainer.max_steps:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 and self.saved_at != trainer.global_step:  # ended by max_epochs or max_time
            self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Several ranks save only where they all stopped together: saving waits for every rank.
        agreed = isinstance(exception, StopRequested) or trainer.world_size == 1
        if isinstance(exception, KeyboardInterrupt) and agreed and trainer.global_step > 0:
            self._save(trainer)
            self.interrupted_at = trainer.global_step
            self.signal_name = getattr(exception, "signal_name", "SIGINT")

    def _save(self, trainer) -> None:
        trainer.save_checkpoint(self.last, weights_only=False)  # the full state: optimizer, scheduler, loops
        self.saved_at = trainer.global_step


class Throughput(pl.Callback):
    """Counts training tokens (non-padding inputs, all ranks) and wall time; the progress bar and summary read it."""

    def __init__(self):
        self.tokens = 0
        self.train_seconds = 0.0
        self._window: list[tuple[float, int]] = []  # (time, tokens) of recent steps, for a current tokens/s
        self._start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pad_mask = batch.get("pad_mask")
        n = batch["input_ids"].numel() - (0 if pad_mask is None else int(pad_mask.sum()))
        self.tokens += n * trainer.world_size
        now = time.perf_counter()
        self._window = (self._window + [(now, self.tokens)])[-20:]

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_seconds = time.perf_counter() - self._start

    @property
    def tokens_per_second(self) -> float:
        if len(self._window) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._window[0], self._window[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)


class RunSummary(pl.Callback):
    """At the end: summary.json, a summary table on the console, and loss.png (train and validation loss)."""

    def __init__(self, run_dir: Path, throughput: Throughput, console: Console, bytes_per_token: float | None):
        self.run_dir = run_dir
        self.throughput = throughput
        self.console = console
        self.bytes_per_token = bytes_per_token  # for bits per byte (causal LMs only)
        self.last_train_loss: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The logged loss: the step's mean over all ranks, not this rank's share of the batch.
        self.last_train_loss = float(trainer.callback_metrics["train_loss"])

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        val_loss = trainer.callback_metrics.get("val_loss")
        val_loss = None if val_loss is None else float(val_loss)
        seconds = self.throughput.train_seconds
        summary = {
            "steps": trainer.global_step,
            "tokens": self.throughput.tokens,
            "wall_seconds": round(seconds, 2),
            "tokens_per_second": round(self.throughput.tokens / seconds, 1) if seconds > 0 else None,
            "train_loss": self.last_train_loss,
            "val_loss": val_loss,
            "val_bits_per_byte": (
                val_loss / math.log(2) / self.bytes_per_token
                if val_loss is not None and self.bytes_per_token
                else None
            ),
        }
        write_atomically(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_losses(self.run_dir, self.run_dir / "loss.png")

        table = Table(title="run summary", show_header=False)
        table.add_row("run directory", str(self.run_dir))
        for key, value in summary.items():
            table.add_row(key.replace("_", " "), _format(key, value))
        self.console.print(table)


def _format(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("steps", "tokens"):
        return f"{value:,}"
    if key in ("wall_seconds", "tokens_per_second"):
        return f"{value:,.1f}"
    return f"{value:.4f}"


def csv_logs(run_dir: Path) -> list[Path]:
    """The run's CSV metric logs in order: csv/ first, then one folder per resume (csv-1, csv-2, ...)."""
    resumed = sorted(run_dir.glob("csv-*/metrics.csv"), key=lambda p: int(p.parent.name.split("-")[1]))
    return [p for p in [run_dir / "csv" / "metrics.csv", *resumed] if p.is_file()]


def plot_losses(run_dir: Path, out: Path) -> None:
    """Plot train and validation loss against steps from Lightning's CSV logs (nothing if there is no log)."""
    import csv

    series: dict[str, list[tuple[int, float]]] = {"train_loss": [], "val_loss": []}
    for metrics_csv in csv_logs(run_dir):
        with metrics_csv.open() as f:
            for row in csv.DictReader(f):
                for key, points in series.items():
                    if row.get(key):
                        points.append((int(row["step"]), float(row[key])))
    if not any(series.values()):
        return

    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, style in (("train_loss", "train", "-"), ("val_loss", "validation", "o-")):
        if series[key]:
            steps, losses = zip(*series[key])
            ax.plot(steps, losses, style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
