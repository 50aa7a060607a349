"""A killed run loses nothing: SIGKILL a training run at random moments, resume it with `--resume auto`, and end
with exactly the weights of a run that was never interrupted."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

TINY = [
    "model.num_channels=32", "model.num_heads=4", "model.max_latents=8", "model.num_self_attention_layers=1",
    "model.cross_attention_dropout=0.5",  # draws from torch's global generator every step
    "data.max_seq_len=32", "data.batch_size=4", "data.random_shift=true",
    "data.random_truncation=true", "data.min_seq_len=8",  # draw from the collator's generator every batch
    "trainer.max_steps=800", "trainer.val_check_interval=20", "trainer.limit_val_batches=1",
    "trainer.deterministic=true", 'output.sample_prompt=""', "data.tokenizer=utf8",
]


def start(runs: Path, *options: str) -> subprocess.Popen:
    """`perceiver train` at tiny size in a subprocess; `options` come last, so their --set overrides win."""
    args = [sys.executable, "-m", "perceiver_cli", "train", "--preset", "clm-small", "--output", str(runs)]
    for override in TINY:
        args += ["--set", override]
    args += options
    env = {**os.environ, "PERCEIVER_DEBUG": "0"}
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def step_of(checkpoint: Path) -> int:
    return torch.load(checkpoint, weights_only=True)["global_step"]


def weights(runs: Path) -> dict[str, torch.Tensor]:
    [last] = runs.glob("clm-small/*/checkpoints/last.ckpt")
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 800
    return checkpoint["state_dict"]


def kill_after_a_checkpoint(process: subprocess.Popen, last: Path, after_step: int, rng: random.Random) -> int:
    """SIGKILL the run at a random moment once it has saved a checkpoint beyond `after_step`; the step it saved."""
    deadline = time.monotonic() + 120
    while not (last.exists() and step_of(last) > after_step):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.5))  # anywhere: mid-step, mid-validation, mid-checkpoint write
    process.send_signal(signal.SIGKILL)
    process.wait()
    return step_of(last)  # still readable: checkpoints are replaced atomically


def test_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    reference = start(tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    runs = tmp_path / "interrupted"
    last = runs / "clm-small" / "version_0" / "checkpoints" / "last.ckpt"
    rng = random.Random(0)
    saved = 0
    process = start(runs)
    for _ in range(2):
        saved = kill_after_a_checkpoint(process, last, saved, rng)
        assert 0 < saved < 800
        process = start(runs, "--resume", "auto")
    assert process.wait(timeout=300) == 0, process.stderr.read()
    assert sorted(p.name for p in (runs / "clm-small").iterdir()) == ["version_0"]

    expected, resumed = weights(tmp_path / "reference"), weights(runs)
    assert expected.keys() == resumed.keys()
    for name in expected:
        # Same data order, masks, dropout draws and arithmetic: bit for bit, not merely close.
        assert torch.equal(expected[name], resumed[name]), name


def test_two_runs_started_at_once_with_one_name_keep_their_own_directories(tmp_path):
    short = ["--set", "trainer.max_steps=20"]
    first, second = start(tmp_path, *short), start(tmp_path, *short)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.wait(timeout=300) == 0, second.stderr.read()
    versions = sorted(p.name for p in (tmp_path / "clm-small").iterdir())
    assert versions == ["version_0", "version_1"]
    for version in versions:
        assert step_of(tmp_path / "clm-small" / version / "checkpoints" / "last.ckpt") == 20
