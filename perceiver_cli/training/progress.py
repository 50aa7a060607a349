"""Progress on the console: the training steps (`StepProgress`) and the data preparation (`data_preparation`).

On a terminal both are rich live displays; in a log file or CI they are plain lines, few enough to read. Only rank 0
shows anything (the other ranks' consoles are quiet, and the callback runs on rank 0 only).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

ETA_WINDOW = 50  # recent steps the time left is estimated from


def eta_seconds(samples: Sequence[tuple[float, int]], total: int | None) -> float | None:
    """Seconds until step `total` at the pace of `samples`, the (time, step) of recent steps, oldest first. None when
    it cannot be told: no total (a run bounded by time or by passes over a stream), fewer than two samples, or no
    step or no time between the first sample and the last."""
    if total is None or len(samples) < 2:
        return None
    (t0, s0), (t1, s1) = samples[0], samples[-1]
    if s1 <= s0 or t1 <= t0:
        return None
    return max(0, total - s1) * (t1 - t0) / (s1 - s0)


def format_duration(seconds: float | None) -> str:
    """"4:05", "1:02:03", "2d 03:04:05"; "-:--" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class StepProgress(pl.Callback):
    """Progress over optimizer steps (not epochs: with max_steps the epoch count means nothing). On a terminal (the
    console's): a rich display with the step, a bar, loss, validation loss, tokens per second, time spent and time left
    (`eta_seconds`). Without a terminal (a log file, CI) a plain line every 5% of the run instead:
    `step 300/6000  loss 2.1234  val 2.2345  12,345 tok/s`."""

    def __init__(self, throughput, console: Console):
        self.throughput = throughput  # callbacks.Throughput: tokens per second
        self.console = console
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.total: int | None = None
        self._samples: deque[tuple[float, int]] = deque(maxlen=ETA_WINDOW)

    @rank_zero_only
    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.estimated_stepping_batches
        self.total = int(total) if math.isfinite(total) else None
        self._samples.clear()
        if not self.console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.fields[steps]}"),
            BarColumn(),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[left]} left"),
            console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=self.total, completed=trainer.global_step, metrics="",
                                           left=format_duration(None), steps=self.total or "?")

    def _fields(self, trainer) -> None:
        self.progress.update(self.task, completed=trainer.global_step, metrics=self._metrics(trainer),
                             left=format_duration(self.seconds_left()))

    def seconds_left(self) -> float | None:
        return eta_seconds(self._samples, self.total)

    def _metrics(self, trainer) -> str:
        metrics = trainer.callback_metrics
        parts = [f"loss {float(metrics['train_loss']):.4f}"] if "train_loss" in metrics else []
        if "val_loss" in metrics:
            parts.append(f"val {float(metrics['val_loss']):.4f}")
        parts.append(f"{self.throughput.tokens_per_second:,.0f} tok/s")
        return "  ".join(parts)

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self._samples or self._samples[-1][1] != step:  # one sample per optimizer step
            self._samples.append((time.perf_counter(), step))
        if self.progress is not None:
            self._fields(trainer)
        elif step % max(1, (self.total or 1000) // 20) == 0:
            self.console.print(f"step {step}/{self.total or '?'}  {self._metrics(trainer)}", highlight=False)

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        self.stop(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.stop(trainer)  # leave the terminal as it was, whatever ended the run

    def stop(self, trainer=None) -> None:
        if self.progress is None:
            return
        if trainer is not None:
            self._fields(trainer)
        self.progress.stop()
        self.progress = None


# --- data preparation ------------------------------------------------------------------------------------------------


class _Steps:
    """The steps of a data preparation (datasets' "Generating train split", "Tokenizing train", ...) as they run: on a
    terminal, a bar each under a spinner; every step that did work ends with one line."""

    def __init__(self, console: Console, title: str):
        self.console = console
        self.progress = None
        if console.is_terminal:
            self.progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=console, transient=True,
            )
            self.progress.add_task(title, total=None)
        self._started: dict[int, tuple[str, float, str]] = {}  # step -> (description, start time, unit)
        self._done: dict[int, int] = {}
        self._tasks: dict[int, TaskID] = {}

    def start(self, key: int, description: str, total: int | None, initial: int, unit: str) -> None:
        self._started[key] = (description, time.perf_counter(), unit.strip() or "items")
        self._done[key] = initial
        if self.progress is not None:
            self._tasks[key] = self.progress.add_task(description, total=total, completed=initial)

    def advance(self, key: int, n: int) -> None:
        if key not in self._started:
            return
        self._done[key] += n
        if self.progress is not None:
            self.progress.update(self._tasks[key], advance=n)

    def finish(self, key: int) -> None:
        if key not in self._started:
            return
        description, start, unit = self._started.pop(key)
        done = self._done.pop(key)
        if self.progress is not None:
            self.progress.remove_task(self._tasks.pop(key))
        if done:
            self.console.print(f"{description}: {done:,} {unit} in {time.perf_counter() - start:,.1f} s",
                               highlight=False)


@contextmanager
def data_preparation(console: Console, title: str = "preparing data (cached after the first run)") -> Iterator[None]:
    """Show the progress of the `datasets` steps run inside (loading files, tokenizing, chunking) on `console`: a
    live display on a terminal, one line per step elsewhere. A run that finds everything cached runs no step and
    prints nothing. `datasets` reports its steps to tqdm bars (which training turns off); they report here instead."""
    import datasets.arrow_dataset
    import datasets.builder
    from datasets.utils.tqdm import tqdm as datasets_tqdm

    steps = _Steps(console, title)

    class Reported(datasets_tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            total = kwargs.get("total")
            steps.start(id(self), str(kwargs.get("desc") or "preparing"), int(total) if total else None,
                        int(kwargs.get("initial") or 0), str(kwargs.get("unit") or ""))

        def update(self, n=1):
            steps.advance(id(self), int(n or 0))

        def close(self):
            steps.finish(id(self))

    modules = [m for m in (datasets.arrow_dataset, datasets.builder) if hasattr(m, "hf_tqdm")]
    saved = [m.hf_tqdm for m in modules]
    for module in modules:
        module.hf_tqdm = Reported
    try:
        if steps.progress is not None:
            with steps.progress:
                yield
        else:
            yield
    finally:
        for module, original in zip(modules, saved):
            module.hf_tqdm = original
