"""The progress display: time left from the recent pace, today's plain lines without a terminal, a live display with
the time left on one, and the data preparation's steps shown once."""

import io
import re
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from perceiver_cli.data.datamodule import TextDataModule
from perceiver_cli.training import progress
from perceiver_cli.training.progress import StepProgress, data_preparation, eta_seconds, format_duration


def test_time_left_comes_from_the_recent_pace():
    assert eta_seconds([(0.0, 10), (20.0, 20)], 100) == pytest.approx(160.0)  # 2 s a step, 80 steps to go
    assert eta_seconds([(5.0, 0), (6.0, 4), (7.0, 8)], 8) == 0.0  # done
    assert eta_seconds([(0.0, 0), (1.0, 1)], None) is None  # no total: a run bounded by time or passes
    assert eta_seconds([(0.0, 3)], 100) is None  # one sample: no pace yet
    assert eta_seconds([(0.0, 3), (1.0, 3)], 100) is None  # no step between the samples
    assert [format_duration(s) for s in (0, 65, 3_725, 2 * 86_400 + 3_725, None)] == [
        "0:00", "1:05", "1:02:05", "2d 01:02:05", "-:--"]


class FakeTrainer(SimpleNamespace):
    def __init__(self, total):
        super().__init__(global_step=0, estimated_stepping_batches=total, callback_metrics={})

    def step(self, loss):
        self.global_step += 1
        self.callback_metrics = {"train_loss": torch.tensor(loss)}


def run_steps(console, steps=40, total=40, clock=None, monkeypatch=None):
    throughput = SimpleNamespace(tokens_per_second=1234.0)
    callback = StepProgress(throughput, console)
    if clock is not None:
        monkeypatch.setattr(progress, "time", SimpleNamespace(perf_counter=clock))
    trainer = FakeTrainer(total)
    callback.on_train_start(trainer, None)
    for i in range(steps):
        trainer.step(2.0 - i / 100)
        callback.on_train_batch_end(trainer, None, None, None, i)
    return callback, trainer


def test_without_a_terminal_the_plain_lines_keep_their_format():
    out = io.StringIO()
    callback, trainer = run_steps(Console(file=out, force_terminal=False, width=200))
    callback.on_train_end(trainer, None)
    lines = out.getvalue().splitlines()
    assert len(lines) == 20 and lines[0] == "step 2/40  loss 1.9900  1,234 tok/s"  # every 5% of the run
    assert all(re.fullmatch(r"step \d+/40  loss \d\.\d{4}  1,234 tok/s", line) for line in lines)


def test_on_a_terminal_the_display_shows_steps_loss_speed_and_time_left(monkeypatch):
    out = io.StringIO()
    ticks = iter(range(1000))
    callback, trainer = run_steps(Console(file=out, force_terminal=True, width=160), steps=10, total=100,
                                  clock=lambda: 3.0 * next(ticks), monkeypatch=monkeypatch)
    assert callback.seconds_left() == pytest.approx(270.0)  # 3 s a step, 90 steps to go
    callback.on_train_end(trainer, None)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # without the terminal's control codes
    assert "step 10/100" in text and "loss 1.9100" in text and "1,234 tok/s" in text
    assert "4:30 left" in text
    assert callback.progress is None  # stopped: the terminal is left as it was


def test_an_unknown_total_shows_no_time_left(monkeypatch):
    out = io.StringIO()
    ticks = iter(range(1000))
    callback, trainer = run_steps(Console(file=out, force_terminal=True, width=160), steps=3,
                                  total=float("inf"), clock=lambda: float(next(ticks)), monkeypatch=monkeypatch)
    callback.on_train_end(trainer, None)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "step 3/?" in text and "-:-- left" in text


@pytest.mark.parametrize("terminal", [False, True])
def test_data_preparation_shows_its_steps_once(terminal, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i} {'word ' * (i % 17)}{terminal}" for i in range(300)))

    def prepare() -> str:
        out = io.StringIO()
        console = Console(file=out, force_terminal=terminal, width=160)
        with data_preparation(console):
            TextDataModule("clm", source="files", path=str(corpus), max_seq_len=32).prepare_data()
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())

    first = prepare()
    for step in ("Generating train split", "Tokenizing train", "Chunking train", "Tokenizing validation"):
        assert first.count(f"{step}: ") == 1, first  # one line as each step ends
    assert "Tokenizing train: 285 examples in" in first
    assert "Tokenizing" not in prepare()  # cached: nothing to show
