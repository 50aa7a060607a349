"""Training on several processes, on this machine's CPU (gloo): DDP through the `perceiver` command (Lightning
starts the second rank) and through torchrun; FSDP through tests/fsdp_cpu_train.py (Lightning and torch run FSDP
on CUDA only; that script lifts their refusals); and what needs no processes: launcher detection, run directories,
the FSDP wrapping policy and the config checks.

Loss tolerance: 2 ranks x batch 4 and 1 process x batch 8 see the same examples at every step (the data module's
sampler) and average the same gradients, so their losses differ only by float32 rounding (the order of sums):
measured at most 5e-7 over 6 steps that take the loss from 5.57 to 3.4. The tests allow 1e-5.
"""

import contextlib
import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_runner import run_cli
from perceiver_cli.checkpoints import load_model
from perceiver_cli.config import load_run_config
from perceiver_cli.errors import UserError
from perceiver_cli.training.launch import check_layout, detect_launch
from perceiver_cli.runs import resume_checkpoint
from perceiver_cli.training.run_dir import run_dir_for

TESTS = Path(__file__).parent
LOSS_TOLERANCE = 1e-5
# A tiny Perceiver AR whose randomness one process and several draw alike, so that they see the very same
# computation: random truncation (one length per step on every rank; lengths up to 16 leave no prefix, the case that
# hung in issue 17), no dropout, no random windows (those draw per rank). Global batch 8.
TINY = """
[model]
task = "clm"
num_channels = 32
num_heads = 4
max_latents = 16
num_self_attention_layers = 2
cross_attention_dropout = 0.0

[data]
max_seq_len = 64
batch_size = 8
random_truncation = true
min_seq_len = 8

[optimizer]
lr = 1e-2
weight_decay = 0.01

[trainer]
accelerator = "cpu"
max_steps = 6
val_check_interval = 3
limit_val_batches = 2
log_every_n_steps = 1
gradient_clip_val = 0.05  # clips at every step, so that the strategies' clipping is compared too
"""
TWO_RANKS = ["--set", "data.batch_size=4", "--set", "trainer.strategy=ddp", "--set", "trainer.devices=2"]


def free_port() -> str:
    """A port for the ranks to meet on: runs of other tests (and other test sessions) must not share one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(*command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_PORT": free_port()}
    result = subprocess.run([sys.executable, *command], cwd=cwd, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def train(preset: Path, runs: Path, *args: str, launcher: tuple[str, ...] = ("-m", "perceiver_cli")):
    return run(*launcher, "train", "--preset", str(preset), "--output", str(runs), *args, cwd=runs.parent)


def losses(run_dir: Path, log: str = "csv") -> dict[int, float]:
    with (run_dir / log / "metrics.csv").open() as f:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(f) if row["train_loss"]}


def checkpoint(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


def assert_same_training(run_dir: Path, reference: Path) -> None:
    """The same losses at every step, and the same weights at the end, as the single-process reference run."""
    assert losses(run_dir).keys() == losses(reference).keys()
    for step, loss in losses(reference).items():
        assert abs(losses(run_dir)[step] - loss) < LOSS_TOLERANCE, step
    weights, reference_weights = checkpoint(run_dir)["state_dict"], checkpoint(reference)["state_dict"]
    assert weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    preset = tmp_path_factory.mktemp("preset") / "tiny.toml"
    preset.write_text(TINY)
    return preset


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory) -> Path:
    """The reference: one process, batch 8."""
    runs = tmp_path_factory.mktemp("one") / "runs"
    train(tiny, runs)
    return runs / "tiny" / "version_0"


def test_ddp_on_two_processes_trains_like_one_and_resumes_under_torchrun(tiny, one_process, tmp_path):
    runs = tmp_path / "runs"
    out = train(tiny, runs, *TWO_RANKS).stdout
    run_dir = runs / "tiny" / "version_0"
    assert_same_training(run_dir, one_process)
    # One run directory, one set of checkpoints, one voice on the console.
    assert sorted(p.name for p in (runs / "tiny").iterdir()) == ["version_0"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert {"config.toml", "summary.json", "loss.png", "csv", "tensorboard"} <= {p.name for p in run_dir.iterdir()}
    assert out.count("tiny: clm model with") == 1 and out.count("step 3/6") == 1
    assert "GLOBAL_RANK: 1" not in out
    assert json.loads((run_dir / "summary.json").read_text())["train_loss"] == pytest.approx(losses(run_dir)[5])

    # torchrun starts both ranks itself; `--resume auto` continues the same run in the same directory.
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "perceiver_cli")
    out = train(tiny, runs, "--resume", "auto", "--set", "trainer.max_steps=9", launcher=torchrun).stdout
    assert out.count("resuming from") == 1
    assert checkpoint(run_dir)["global_step"] == 9
    assert sorted(p.name for p in (runs / "tiny").iterdir()) == ["version_0"]
    assert sorted(losses(run_dir, "csv-1")) == [6, 7, 8]


def test_each_example_is_trained_on_once_per_epoch(tmp_path):
    """The union over ranks of one epoch's examples is the training set. 2 ranks split an odd number of examples,
    so the sampler repeats one (the first of the epoch's order) to give both ranks the same number of steps."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("\n\n".join(f"Document {i} is about the number {i * 7}." for i in range(72)))
    (corpus / "validation.txt").write_text("A short validation document.")
    preset = tmp_path / "tiny.toml"
    preset.write_text(TINY.replace("max_steps = 6", "max_epochs = 1").replace("val_check_interval = 3", ""))
    records = tmp_path / "records"
    records.mkdir()
    train(preset, tmp_path / "runs", *TWO_RANKS, "--set", "data.source=files", "--set", f"data.path={corpus}",
          launcher=(str(TESTS / "recording_train.py"), str(records)))
    ranks = [json.loads((records / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    examples = ranks[0]["examples"]
    assert examples % 2 == 1  # the case with padding
    seen = [index for rank in ranks for step in rank["steps"] for index in step]
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"])  # the same number of steps on both ranks
    assert set(seen) == set(range(examples))  # none dropped
    assert len(seen) == examples + 1  # one repeated, to make the count even


def test_fsdp_on_two_cpu_processes_shards_the_attention_layers_and_resumes_on_one(tiny, one_process, tmp_path):
    runs, report = tmp_path / "runs", tmp_path / "wrapping.json"
    train(tiny, runs, *TWO_RANKS, launcher=(str(TESTS / "fsdp_cpu_train.py"), str(report)))
    wrapping = json.loads(report.read_text())
    layers = ["CrossAttentionLayer", "SelfAttentionLayer", "SelfAttentionLayer"]
    assert wrapping == {"root": "LitCausalLanguageModel", "sharded": layers, "checkpointed": layers}
    run_dir = runs / "tiny" / "version_0"
    assert_same_training(run_dir, one_process)
    # One consolidated checkpoint file: it loads like any other, with the optimizer's weight-decay groups intact.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert load_model(run_dir).config.num_self_attention_layers == 2
    group_sizes = [[len(g["params"]) for g in checkpoint(r)["optimizer_states"][0]["param_groups"]]
                   for r in (run_dir, one_process)]
    assert group_sizes[0] == group_sizes[1] and group_sizes[0][0] > 0

    out = train(tiny, runs, "--resume", "auto", "--set", "trainer.strategy=auto", "--set", "trainer.devices=1",
                "--set", "trainer.max_steps=9").stdout
    assert "resuming from" in out and checkpoint(run_dir)["global_step"] == 9


# ---------------------------------------------------------------------------------------------------------------
# The shipped presets' settings under DDP; stops, dead ranks and the watchdog, with real processes
# ---------------------------------------------------------------------------------------------------------------

# clm-small at a tiny size, its path-changing settings on: random windows and lengths (lengths up to 16, the latents,
# leave no prefix: the hang of issue 17), cross-attention dropout, a validation, a sample and a checkpoint every 5
# steps.
CLM_SMALL_TINY = [
    "model.num_channels=32", "model.num_heads=4", "model.max_latents=16", "model.num_self_attention_layers=1",
    "data.max_seq_len=64", "data.batch_size=4", "data.min_seq_len=8", "trainer.accelerator=cpu",
    "trainer.val_check_interval=5", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
    "output.sample_max_new_tokens=8", "data.tokenizer=utf8",
]
MLM_SMALL_TINY = [
    # 64 bytes in blocks of 8 (the preset's block routing): 8 latents and a sink, 10-channel position codes.
    "model.num_latents=9", "model.num_latent_channels=32", "model.encoder.num_input_channels=32",
    "model.encoder.num_cross_attention_qk_channels=80", "model.encoder.num_cross_attention_v_channels=32",
    "model.encoder.num_self_attention_qk_channels=32", "model.encoder.num_self_attention_v_channels=32",
    "model.encoder.num_self_attention_layers_per_block=1", "model.decoder.num_cross_attention_qk_channels=96",
    "model.decoder.num_cross_attention_v_channels=32", "data.max_seq_len=64", "data.batch_size=4",
    "trainer.accelerator=cpu", "trainer.val_check_interval=5", "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
]
DDP = ["trainer.strategy=ddp", "trainer.devices=2"]
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "perceiver_cli")


class Training:
    """`perceiver train` in a subprocess, its output in files (a pipe nobody reads would block it)."""

    def __init__(self, tmp: Path, preset: str, overrides: list[str], launcher=(sys.executable, "-m", "perceiver_cli"),
                 resume: bool = False):
        self.runs, self.out, self.err = tmp / "runs", tmp / "out.txt", tmp / "err.txt"
        args = [*launcher, "train", "--preset", preset, "--output", str(self.runs)]
        for override in overrides:
            args += ["--set", override]
        args += ["--resume", "auto"] if resume else []
        env = {**os.environ, "MASTER_PORT": free_port(), "PERCEIVER_DEBUG": "0"}
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen(args, stdout=out, stderr=err, cwd=tmp, env=env, text=True)
        self.seen: set[int] = set()  # the other ranks seen: killed at the end even once rank 0 is gone

    @property
    def run_dir(self) -> Path:
        [checkpoints] = self.runs.glob("*/*/checkpoints")
        return checkpoints.parent

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def saved_step(self) -> int | None:
        lasts = list(self.runs.glob("*/*/checkpoints/last.ckpt"))
        return torch.load(lasts[0], weights_only=True)["global_step"] if lasts else None

    def wait_for_checkpoint(self, after_step: int, deadline: float = 150) -> int:
        """The step of a `last.ckpt` saved beyond `after_step` (training on, every rank alive)."""
        end = time.monotonic() + deadline
        while (self.saved_step() or 0) <= after_step:
            assert self.process.poll() is None, self.output()[-3000:]
            assert time.monotonic() < end, "no checkpoint: the ranks hang?\n" + self.output()[-3000:]
            time.sleep(0.2)
        return self.saved_step()

    def other_ranks(self) -> list[int]:
        """The ranks Lightning started: children of this process running the same command."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        ranks = [int(c) for c in children if "train" in Path(f"/proc/{c}/cmdline").read_text()]
        self.seen.update(ranks)
        return ranks

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            self.other_ranks()
        for pid in [*self.seen, self.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def all_ended_within(pids: list[int], seconds: float) -> float:
    """Seconds until every process in `pids` has ended; fails after `seconds`."""
    start = time.monotonic()
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
              for pid in pids):
        assert time.monotonic() - start < seconds, f"still running after {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - start


def stop_with(run: "Training", sig: int, after_step: int = 5) -> tuple[int, float]:
    """Send `sig` to the launching process once `after_step` is checkpointed: (its exit status, seconds until every
    rank had ended)."""
    try:
        run.wait_for_checkpoint(after_step=after_step)
        ranks = [run.process.pid, *run.other_ranks()]
        assert len(ranks) == 2
        run.process.send_signal(sig)
        seconds = all_ended_within(ranks, 20)
    finally:
        status = run.wait(timeout=30)
    return status, seconds


def test_clm_small_settings_train_under_ddp_stop_cleanly_on_sigterm_and_resume_under_torchrun(tmp_path):
    """The issue-17 hang, SIGTERM and resuming: clm-small's settings on 2 ranks cross validations, samples and
    checkpoints; SIGTERM to the launching process ends every rank within seconds and saves the current step, as in
    one process; `--resume auto` under torchrun continues from it, through another validation and checkpoint."""
    run = Training(tmp_path, "clm-small", CLM_SMALL_TINY + DDP + ["trainer.max_steps=10000"])
    # validations, samples and checkpoints at steps 5 and 10
    status, seconds = stop_with(run, signal.SIGTERM, after_step=10)
    out = run.output()
    assert status == 143, out[-3000:]
    stopped = run.saved_step()
    assert f"SIGTERM: saved step {stopped} to" in out and "Traceback" not in out
    assert out.count("sample @ step 5:") == 1 and out.count("sample @ step 10:") == 1  # rank 0 alone speaks
    print(f"SIGTERM ended both ranks in {seconds:.2f} s")

    resumed = Training(tmp_path, "clm-small", CLM_SMALL_TINY + [f"trainer.max_steps={stopped + 6}"],
                       launcher=TORCHRUN, resume=True)
    assert resumed.wait(timeout=180) == 0, resumed.output()[-3000:]
    assert resumed.saved_step() == stopped + 6
    assert sorted(losses(run.run_dir, "csv-1")) == list(range(stopped, stopped + 6))
    assert f"sample @ step {(stopped // 5 + 1) * 5}:" in resumed.output()


def test_a_stuck_rank_ends_the_run_on_every_rank_within_the_collective_timeout_and_resume_continues(tmp_path):
    """The watchdog: rank 1 frozen (SIGSTOP) leaves rank 0 waiting in a collective; after trainer.collective_timeout
    rank 0 ends with one error naming what it waited for and its last step, the last checkpoint intact."""
    run = Training(tmp_path, "clm-small", CLM_SMALL_TINY + DDP + ["trainer.max_steps=10000",
                                                                  "trainer.collective_timeout=3"])
    try:
        saved = run.wait_for_checkpoint(after_step=5)
        [rank_1] = run.other_ranks()
        os.kill(rank_1, signal.SIGSTOP)
        stopped_at = time.monotonic()
        status = run.process.wait(timeout=60)
        seconds = time.monotonic() - stopped_at
    finally:
        run.kill()
    err = run.err.read_text()
    assert status == 2, err[-3000:]
    [error] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "rank 0 waited more than 3 s (trainer.collective_timeout) for" in error
    last_step = int(error.split("the last completed step is ")[1].split(";")[0])
    assert f"last good checkpoint is {run.run_dir / 'checkpoints' / 'last.ckpt'}" in error
    assert "Traceback" not in err
    assert 3 <= seconds < 3 + 20  # the timeout, then shutting down
    saved = run.saved_step()
    assert 5 <= saved <= last_step  # intact: it loads
    print(f"rank 0 ended {seconds:.2f} s after rank 1 froze (collective_timeout 3 s): {error}")

    resumed = Training(tmp_path, "clm-small", CLM_SMALL_TINY + DDP + [f"trainer.max_steps={saved + 3}"], resume=True)
    assert resumed.wait(timeout=180) == 0, resumed.output()[-3000:]
    assert resumed.saved_step() == saved + 3 and "resuming from" in resumed.output()


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_rank_makes_the_other_exit_with_a_clear_error(tmp_path, victim):
    run = Training(tmp_path, "clm-small", CLM_SMALL_TINY + DDP + ["trainer.max_steps=10000"])
    try:
        run.wait_for_checkpoint(after_step=5)
        ranks = [run.process.pid, *run.other_ranks()]
        os.kill(ranks[victim], signal.SIGKILL)
        seconds = all_ended_within(ranks, 60)  # the default collective_timeout is minutes: not waited for
    finally:
        run.kill()
    err = run.err.read_text()
    survivor = 1 - victim
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert any(f"another rank stopped (its connection closed) while rank {survivor} waited for" in e for e in errors)
    assert "Traceback" not in err
    assert run.saved_step() >= 5
    print(f"rank {survivor} ended {seconds:.2f} s after rank {victim} was killed")


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_and_saves_the_step(tmp_path):
    run = Training(tmp_path, "mlm-small", MLM_SMALL_TINY + DDP + ["trainer.max_steps=10000"])
    status, seconds = stop_with(run, signal.SIGINT)
    out = run.output()
    assert status == 130 and f"SIGINT: saved step {run.saved_step()} to" in out, out[-3000:]
    assert out.count("error: interrupted") == 1 and "Traceback" not in out
    print(f"Ctrl-C ended both ranks in {seconds:.2f} s")


@pytest.mark.slow
@pytest.mark.parametrize("preset, overrides", [
    # What one process and several draw alike (see TINY): clm-small without dropout and random windows, mlm-small
    # with static masks; both cross validations, checkpoints and (clm) samples.
    ("clm-small", CLM_SMALL_TINY + ["model.cross_attention_dropout=0.0", "data.random_shift=false"]),
    ("mlm-small", MLM_SMALL_TINY + ["data.static_masking=true"]),
])
@pytest.mark.parametrize("launcher", ["perceiver", "torchrun"])
def test_shipped_presets_train_on_two_ranks_like_one_process(tmp_path, preset, overrides, launcher):
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    one = Training(tmp_path / "one", preset, [o.replace("batch_size=4", "batch_size=8") for o in overrides]
                   + ["trainer.max_steps=12"])
    assert one.wait(timeout=180) == 0, one.output()[-3000:]
    two = Training(tmp_path / "two", preset, overrides + ["trainer.max_steps=12"]
                   + (["trainer.strategy=ddp"] if launcher == "torchrun" else DDP),
                   launcher=TORCHRUN if launcher == "torchrun" else (sys.executable, "-m", "perceiver_cli"))
    assert two.wait(timeout=180) == 0, two.output()[-3000:]
    assert_same_training(two.run_dir, one.run_dir)
    assert sorted(p.name for p in (two.run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.mark.slow
@pytest.mark.parametrize("preset, tiny", [("clm-small", CLM_SMALL_TINY), ("mlm-small", MLM_SMALL_TINY)])
def test_shipped_presets_with_all_their_settings_train_under_torchrun(tmp_path, preset, tiny):
    run = Training(tmp_path, preset, tiny + ["trainer.max_steps=12", "trainer.strategy=ddp"], launcher=TORCHRUN)
    assert run.wait(timeout=180) == 0, run.output()[-3000:]
    assert run.saved_step() == 12
    assert all(math.isfinite(loss) for loss in losses(run.run_dir).values())


@pytest.mark.slow
def test_fsdp_stops_cleanly_on_sigterm_and_its_watchdog_ends_a_stuck_run(tiny, tmp_path):
    """The same checks under FSDP (the CPU shim): the clean stop saves a consolidated checkpoint, which resumes in
    one process; a frozen rank ends the run within the collective timeout."""
    fsdp = (sys.executable, str(TESTS / "fsdp_cpu_train.py"), str(tmp_path / "wrapping.json"))
    (tmp_path / "stop").mkdir()
    run = Training(tmp_path / "stop", str(tiny), DDP + ["data.batch_size=4", "trainer.max_steps=10000",
                                                       "trainer.val_check_interval=5"], launcher=fsdp)
    status, seconds = stop_with(run, signal.SIGTERM)
    stopped = run.saved_step()
    assert status == 143 and f"SIGTERM: saved step {stopped} to" in run.output(), run.output()[-3000:]
    print(f"FSDP: SIGTERM ended both ranks in {seconds:.2f} s")
    resumed = Training(tmp_path / "stop", str(tiny), ["trainer.strategy=auto", "trainer.devices=1",
                                                      f"trainer.max_steps={stopped + 2}"], resume=True)
    assert resumed.wait(timeout=180) == 0 and resumed.saved_step() == stopped + 2, resumed.output()[-3000:]

    (tmp_path / "stuck").mkdir()
    run = Training(tmp_path / "stuck", str(tiny), DDP + ["data.batch_size=4", "trainer.max_steps=10000",
                                                        "trainer.val_check_interval=5",
                                                        "trainer.collective_timeout=3"], launcher=fsdp)
    try:
        run.wait_for_checkpoint(after_step=5)
        [rank_1] = run.other_ranks()
        os.kill(rank_1, signal.SIGSTOP)
        status = run.process.wait(timeout=60)
    finally:
        run.kill()
    err = run.err.read_text()
    assert status == 2 and "rank 0 waited more than 3 s (trainer.collective_timeout) for" in err, err[-3000:]
    assert run.saved_step() >= 5


# ---------------------------------------------------------------------------------------------------------------
# Without processes
# ---------------------------------------------------------------------------------------------------------------


TORCHRUN_ENV = {"TORCHELASTIC_RUN_ID": "abc", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
                "LOCAL_WORLD_SIZE": "2"}
SLURM_ENV = {"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_PROCID": "5",
             "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_JOB_NAME": "train"}


def test_the_launcher_is_read_as_lightning_reads_it():
    assert detect_launch(TORCHRUN_ENV) == detect_launch(TORCHRUN_ENV | SLURM_ENV)  # torchrun inside SLURM
    t = detect_launch(TORCHRUN_ENV)
    assert (t.launcher, t.rank, t.local_rank, t.devices, t.num_nodes, t.job) == ("torchrun", 3, 1, 2, 2, "torchrun-abc")
    s = detect_launch(SLURM_ENV)
    assert (s.launcher, s.rank, s.local_rank, s.devices, s.num_nodes, s.job) == ("slurm", 5, 1, 4, 2, "slurm-77.0")
    # In an interactive SLURM shell the user launches: a rank Lightning started is read from LOCAL_RANK.
    interactive = detect_launch(SLURM_ENV | {"SLURM_JOB_NAME": "interactive", "LOCAL_RANK": "1"})
    assert (interactive.launcher, interactive.rank) == ("lightning", 1)
    assert detect_launch({}).rank == 0 and detect_launch({}).world_size == 1


def test_an_external_launcher_decides_devices_and_nodes():
    cfg, _ = load_run_config("clm-small", ["trainer.devices=8"])
    trainer, note = check_layout(cfg.trainer, detect_launch(SLURM_ENV))
    assert (trainer.devices, trainer.num_nodes) == (4, 2) and "the preset said 8 and 1" in note
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (8, 1)  # the validated config stays as it was
    cfg, _ = load_run_config("clm-small", ["trainer.num_nodes=2"])
    with pytest.raises(UserError, match="one machine"):
        check_layout(cfg.trainer, detect_launch({}))


def test_ranks_started_by_torchrun_share_a_run_directory_named_by_the_job(tmp_path, monkeypatch):
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    assert run_dir_for(tmp_path, "x", None) == tmp_path / "x" / "torchrun-abc"
    (tmp_path / "x" / "torchrun-abc" / "checkpoints").mkdir(parents=True)
    (tmp_path / "x" / "torchrun-abc" / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resume_checkpoint("auto", tmp_path, "x").parent.parent.name == "torchrun-abc"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # a static rendezvous without --rdzv-id
    with pytest.raises(UserError, match="without a rendezvous id") as err:
        run_dir_for(tmp_path, "x", None)
    assert "--rdzv-id" in err.value.hint


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_fsdp_shards_and_checkpoints_exactly_the_attention_layers(task):
    from perceiver_cli.models.layers import CrossAttentionLayer, SelfAttentionLayer
    from perceiver_cli.training import distributed
    from perceiver_cli.training.build import build_lit_model

    cfg, _ = load_run_config(f"{task}-small", ["trainer.strategy=fsdp", "trainer.accelerator=gpu",
                                               'output.sample_prompt=""', "trainer.fsdp.activation_checkpointing=true",
                                               "optimizer.name=adamw"])  # Muon needs whole matrices
    strategy = distributed.build_strategy(cfg)
    model = build_lit_model(cfg, 262)
    layers = {m for m in model.modules() if isinstance(m, (CrossAttentionLayer, SelfAttentionLayer))}
    assert len(layers) >= 3
    for policy in (strategy.kwargs["auto_wrap_policy"], strategy._activation_checkpointing_kwargs["auto_wrap_policy"]):
        assert set(policy._run_policy(model, set(), {})) == layers
    assert strategy.sharding_strategy.name == "FULL_SHARD" and strategy._state_dict_type == "full"
    assert distributed.gradient_clip_val(cfg) is None  # clipped by ShardedGradientClipping instead
    assert [type(c).__name__ for c in distributed.strategy_callbacks(cfg)] == ["ShardedGradientClipping"]


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["trainer.accelerator=cpu"], 'strategy "fsdp" needs CUDA GPUs'),
        (["model.activation_checkpointing=true"], "trainer.fsdp.activation_checkpointing = true instead"),
        (['output.sample_prompt="Once"'], "validation samples are not generated"),
        (['trainer.fsdp.sharding="hybrid_shard"'], "needs the number of devices per node"),
    ],
)
def test_fsdp_settings_that_cannot_work_are_refused(overrides, problem):
    base = ["trainer.strategy=fsdp", "trainer.accelerator=gpu", 'output.sample_prompt=""']
    with pytest.raises(UserError, match=problem):
        load_run_config("clm-small", base + overrides)


def test_fsdp_settings_are_inert_under_other_strategies():
    cfg, _ = load_run_config("clm-small", ["trainer.fsdp.activation_checkpointing=true"])  # a saved FSDP run, resumed
    assert cfg.trainer.strategy == "auto"


def test_c4_preset_builds_from_its_declared_vocabulary(capsys):
    code, out, _ = run_cli(capsys, "train", "--preset", "clm-c4-fsdp", "--dry-run")
    assert code in (0, None)
    assert "453,950,720" in out and 'strategy = "fsdp"' in out and "32,000 (tokenizers/c4-sentencepiece)" in out


def test_a_declared_vocabulary_must_match_the_tokenizer_on_disk(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--preset", "clm-small", "--set", "data.vocab_size=300", "--set",
                           "data.tokenizer=utf8", "--dry-run")
    assert code == 2 and "data.vocab_size = 300, but tokenizer utf8 has 262 tokens" in err
    code, _, err = run_cli(capsys, "train", "--preset", "clm-small", "--output", str(tmp_path), "--set",
                           "data.tokenizer=utf8", "--set", "data.vocab_size=300", "--set", "trainer.max_steps=1")
    assert code == 2 and "data.vocab_size = 300" in err and not (tmp_path / "clm-small").exists()


@pytest.mark.parametrize("seq_len", [5, 12, 13, 48])  # no prefix (shorter than the 12 latents, exactly), a prefix
def test_every_parameter_gets_a_gradient_from_every_batch_length(seq_len):
    """DDP all-reduces the gradients in buckets of parameters and expects every rank to fill the same buckets; a
    parameter left out on one rank (a layer skipped for a short sequence) leaves the ranks waiting in different
    collectives: the hang of issue 17 (random truncation made one rank's batch no longer than the latents)."""
    from perceiver_cli.data.masking import IGNORE_INDEX
    from perceiver_cli.models.lightning import LitCausalLanguageModel, LitMaskedLanguageModel
    from tiny_models import tiny_clm_config, tiny_mlm_config

    torch.manual_seed(0)
    x = torch.randint(6, 262, (2, seq_len))
    pad_mask = torch.zeros_like(x, dtype=torch.bool)
    pad_mask[0, :2] = True  # one left-padded row
    clm = LitCausalLanguageModel.create(tiny_clm_config()).train()
    clm.loss({"input_ids": x, "labels": x, "pad_mask": pad_mask}).backward()
    mlm = LitMaskedLanguageModel.create(tiny_mlm_config(max_seq_len=48)).train()
    labels = torch.full_like(x, IGNORE_INDEX)
    labels[:, 1] = x[:, 1]
    mlm.loss({"input_ids": x, "labels": labels, "pad_mask": pad_mask.flip(1)}).backward()
    for model in (clm, mlm):
        assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_random_truncation_cuts_every_ranks_batch_to_the_same_length(monkeypatch):
    """The ranks' batches of a step are the parts of one global batch: one length on every rank, as one process with
    the whole batch would draw it (and one code path: a batch no longer than the latents has no prefix). Window
    offsets stay per rank, so that the ranks' examples are cut differently."""
    from perceiver_cli.data.collators import CLMCollator

    def batches(rank: int) -> list[dict]:
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
        collate = CLMCollator(0, 64, random_shift=True, random_truncation=True, min_seq_len=8, seed=0)
        chunk = {"input_ids": list(range(10, 140))}  # two chunks' worth: room to shift the window
        return [collate([chunk, chunk]) for _ in range(20)]

    first, second = batches(0), batches(1)
    assert [b["input_ids"].shape[1] for b in first] == [b["input_ids"].shape[1] for b in second]
    assert len({b["input_ids"].shape[1] for b in first}) > 5
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))


def test_the_collective_timeout_is_the_process_groups_and_must_be_positive():
    from perceiver_cli.training.distributed import JOIN_TIMEOUT, build_strategy

    cfg, _ = load_run_config("clm-small", DDP + ["trainer.collective_timeout=1e4"])
    assert build_strategy(cfg)._timeout.total_seconds() == 1e4  # setting up waits at least JOIN_TIMEOUT
    cfg, _ = load_run_config("clm-small", ["trainer.devices=2", "trainer.collective_timeout=5"])  # "auto": ddp
    assert build_strategy(cfg)._timeout == JOIN_TIMEOUT
    with pytest.raises(UserError, match="trainer.collective_timeout"):
        load_run_config("clm-small", ["trainer.collective_timeout=0"])


def test_only_a_failed_collective_is_reported_as_one():
    from perceiver_cli.training.distributed import CollectiveWatch

    watch = CollectiveWatch(timeout=7)
    watch.completed, watch.stage, watch.waited = 41, "step 42", 7  # as in training, after on_train_start
    gloo = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 7000ms for recv operation")
    assert watch.describe(gloo, rank=1) == ("rank 1 waited more than 7 s (trainer.collective_timeout) for step 42; "
                                            "the last completed step is 41")
    peer = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:34508")
    assert watch.describe(peer, rank=0).startswith("another rank stopped (its connection closed) while rank 0")
    assert watch.describe(RuntimeError("DataLoader worker exited unexpectedly"), rank=0) is None
    assert watch.describe(ValueError("Timed out waiting"), rank=0) is None
