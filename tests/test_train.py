"""`perceiver train` end to end on tiny models: run directories, resuming, data sources, failures."""

import json
import math
import time
import tomllib

import pytest
import torch

from cli_runner import run_cli
from perceiver_cli.checkpoints import load_model

TINY = {
    "clm": [
        "model.num_channels=32", "model.num_heads=4", "model.max_latents=16", "model.num_self_attention_layers=1",
        "data.max_seq_len=64", "data.batch_size=4", "trainer.max_steps=4", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1", 'output.sample_prompt=""',
        "data.tokenizer=utf8",  # bytes: these tests are not about the run-trained BPE of the preset
    ],
    "mlm": [
        # 64 bytes in blocks of 8 (the preset's block routing): 8 latents and a sink, 10-channel position codes.
        "model.num_latents=9", "model.num_latent_channels=32", "model.encoder.num_input_channels=32",
        "model.encoder.num_cross_attention_qk_channels=80", "model.encoder.num_cross_attention_v_channels=32",
        "model.encoder.num_self_attention_qk_channels=16", "model.encoder.num_self_attention_v_channels=32",
        "model.encoder.num_self_attention_layers_per_block=1", "model.decoder.num_cross_attention_v_channels=16",
        "data.max_seq_len=64", "data.batch_size=4", "trainer.max_steps=4", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
    ],
}


def train(capsys, task: str, runs, *overrides: str, options: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """`perceiver train --preset TASK-small` at tiny size, with more --set overrides and other options."""
    args = ["train", "--preset", f"{task}-small", "--output", str(runs), *options]
    for override in TINY[task] + list(overrides):
        args += ["--set", override]
    return run_cli(capsys, *args)


def checkpoint_step(path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_a_short_run_writes_the_run_directory(task, capsys, tmp_path):
    code, out, err = train(capsys, task, tmp_path)
    assert code in (0, None), err
    run = tmp_path / f"{task}-small" / "version_0"
    config = tomllib.loads((run / "config.toml").read_text())
    assert config["model"]["task"] == task and config["data"]["max_seq_len"] == 64
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 4
    assert (run / "checkpoints" / "best.ckpt").is_file()
    metrics = (run / "csv" / "metrics.csv").read_text()
    assert "train_loss" in metrics and "val_loss" in metrics
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] > 0 and summary["val_loss"] > 0
    if task == "clm":  # one byte per UTF-8 token: bits per byte is the loss in bits
        assert summary["val_bits_per_byte"] == pytest.approx(summary["val_loss"] / math.log(2))
    else:  # a masked LM's loss covers the masked tokens only
        assert summary["val_bits_per_byte"] is None
    assert "tokens per second" in out
    loaded = load_model(run)
    assert loaded.task == task and loaded.run_config["data"]["max_seq_len"] == 64


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_bf16_mixed_precision_trains_with_gradient_clipping(task, capsys, tmp_path):
    # Lightning refuses to clip the gradients of a fused optimizer under mixed precision.
    code, out, err = train(capsys, task, tmp_path, "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0")
    assert code in (0, None), err
    assert checkpoint_step(tmp_path / f"{task}-small" / "version_0" / "checkpoints" / "last.ckpt") == 4


def test_training_flushes_subnormal_floats_to_zero(capsys, tmp_path):
    """Subnormal floats slow the CPU's matrix products several times (block routing's sharp attention makes them);
    `perceiver train` flushes them to zero in its process."""
    code, _, err = train(capsys, "mlm", tmp_path)
    assert code in (0, None), err
    assert (torch.tensor([1e-39]) * 1.0).item() == 0.0  # 1e-39 is subnormal in float32
    torch.set_flush_denormal(False)  # leave the test process as it was
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0


def test_runs_with_the_same_name_get_their_own_version(capsys, tmp_path):
    for _ in range(2):
        code, _, err = train(capsys, "clm", tmp_path, "trainer.max_steps=1", "trainer.val_check_interval=1")
        assert code in (0, None), err
    assert sorted(p.name for p in (tmp_path / "clm-small").iterdir()) == ["version_0", "version_1"]


def test_resume_continues_from_the_saved_step(capsys, tmp_path):
    code, _, err = train(capsys, "clm", tmp_path)
    assert code in (0, None), err
    last = tmp_path / "clm-small" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint_step(last) == 4
    code, out, err = train(capsys, "clm", tmp_path, "trainer.max_steps=8", options=("--resume", "auto"))
    assert code in (0, None), err
    assert "resuming from" in out
    assert checkpoint_step(last) == 8
    assert not (tmp_path / "clm-small" / "version_1").exists()  # the same run went on
    from perceiver_cli.training.callbacks import csv_logs

    logs = csv_logs(last.parent.parent)
    assert [p.parent.name for p in logs] == ["csv", "csv-1"]  # the log before the resume is kept
    import csv

    steps = [[int(r["step"]) for r in csv.DictReader(p.open()) if r.get("train_loss")] for p in logs]
    assert max(steps[0]) < 4 <= min(steps[1])  # training went on from step 4, not from 0


def test_resume_without_a_run_says_what_to_do(capsys, tmp_path):
    code, _, err = train(capsys, "clm", tmp_path, options=("--resume", "auto"))
    assert code == 2 and "no checkpoint to resume" in err


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_trains_on_a_local_text_file(task, capsys, tmp_path):
    corpus = tmp_path / "corpus.txt"
    paragraphs = [f"Paragraph {i} tells of a river that ran past {i} quiet houses and a mill." for i in range(200)]
    corpus.write_text("\n\n".join(paragraphs))
    code, out, err = train(
        capsys, task, tmp_path / "runs", "data.source=files", f"data.path={corpus}", "trainer.max_steps=2"
    )
    assert code in (0, None), err
    assert f"files {corpus}" in out
    assert (tmp_path / "runs" / f"{task}-small" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_init_from_an_earlier_run(capsys, tmp_path):
    from perceiver_cli.config import load_run_config
    from perceiver_cli.training.build import build_lit_model

    code, _, err = train(capsys, "clm", tmp_path, "trainer.max_steps=1", "trainer.val_check_interval=1")
    assert code in (0, None), err
    source = tmp_path / "clm-small" / "version_0"
    cfg, _ = load_run_config("clm-small", TINY["clm"] + [f"model.init_from={source}"])
    lit = build_lit_model(cfg, vocab_size=262)
    for (name, a), (_, b) in zip(load_model(source).model.state_dict().items(), lit.model.state_dict().items()):
        assert torch.equal(a, b), name
    code, _, err = train(capsys, "clm", tmp_path, "model.num_channels=64", f"model.init_from={source}")
    assert code == 2 and "architecture differs" in err


def test_hub_source_without_network_fails_fast(capsys, tmp_path):
    start = time.perf_counter()
    code, out, err = train(
        capsys, "clm", tmp_path, "data.source=hub", "data.name=wikitext", "data.config_name=wikitext-103-raw-v1"
    )
    assert code == 2 and "wikitext" in err and "Traceback" not in out + err
    assert time.perf_counter() - start < 15


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(capsys, tmp_path, monkeypatch):
    from perceiver_cli.models.lightning import LitCausalLanguageModel

    finite_loss = LitCausalLanguageModel.loss

    def loss_that_breaks_at_step_3(self, batch):
        loss = finite_loss(self, batch)
        return loss * float("nan") if self.global_step >= 3 else loss

    monkeypatch.setattr(LitCausalLanguageModel, "loss", loss_that_breaks_at_step_3)
    code, out, err = train(capsys, "clm", tmp_path, "trainer.max_steps=6")
    assert code == 2 and "became NaN or infinite at step 3" in err and "Traceback" not in out + err
    last = tmp_path / "clm-small" / "version_0" / "checkpoints" / "last.ckpt"
    assert "last good checkpoint" in err and checkpoint_step(last) == 2
    assert all(torch.isfinite(t).all() for t in torch.load(last, weights_only=True)["state_dict"].values())


def test_the_last_checkpoint_holds_the_final_step(capsys, tmp_path):
    # 5 steps, validation (and the periodic last checkpoint) every 2: the end of training saves step 5 too.
    code, _, err = train(capsys, "clm", tmp_path, "trainer.max_steps=5")
    assert code in (0, None), err
    assert checkpoint_step(tmp_path / "clm-small" / "version_0" / "checkpoints" / "last.ckpt") == 5
