"""The window curriculum (`data.short_seq_len`, `short_latents`, `short_fraction`): the first steps of a causal LM
train on each batch's windows cut into short pieces, the rest on whole windows."""

import json

import pytest
import torch

from cli_runner import run_cli
from perceiver_cli.config import load_run_config
from perceiver_cli.data.masking import IGNORE_INDEX
from perceiver_cli.models.clm.windows import short_pieces
from perceiver_cli.models.lightning import LitCausalLanguageModel


def test_short_pieces_keep_every_token_in_order_and_drop_all_padding_pieces():
    ids = torch.arange(20).reshape(2, 10)  # (B, n)
    labels = ids + 100
    pad_mask = torch.zeros(2, 10, dtype=torch.bool)
    pad_mask[1, :7] = True  # the second row: 7 padding positions, then 3 tokens
    pieces = short_pieces({"input_ids": ids, "labels": labels, "pad_mask": pad_mask}, 4)
    # The last 8 positions of each row, cut into pieces of 4; the second row's first piece is all padding.
    assert pieces["input_ids"].tolist() == [[2, 3, 4, 5], [6, 7, 8, 9], [16, 17, 18, 19]]
    assert pieces["labels"].tolist() == [[102, 103, 104, 105], [106, 107, 108, 109], [116, 117, 118, 119]]
    assert pieces["pad_mask"].tolist() == [[False] * 4, [False] * 4, [True, False, False, False]]
    short = {"input_ids": ids[:, :4], "labels": labels[:, :4]}
    assert short_pieces(short, 4) is short  # no longer than a piece: as it is


def tiny_lit(short_windows):
    torch.manual_seed(0)
    return LitCausalLanguageModel(vocab_size=32, max_seq_len=16, max_latents=8, num_channels=16, num_heads=2,
                                  num_self_attention_layers=1, cross_attention_dropout=0.0,
                                  short_windows=short_windows)


def test_the_training_loss_is_the_pieces_loss_during_the_curriculum_and_the_windows_loss_after():
    x = torch.randint(0, 32, (2, 17))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    during = tiny_lit({"seq_len": 4, "latents": 2, "steps": 1})  # global_step 0 < 1: short pieces
    after = tiny_lit({"seq_len": 4, "latents": 2, "steps": 0})
    assert torch.equal(during.state_dict()["model.input_adapter.txt_embedding.weight"],
                       after.state_dict()["model.input_adapter.txt_embedding.weight"])

    # By hand: 8 pieces of 4 tokens, each predicting its last 2 (the pieces' own labels).
    pieces_x, pieces_labels = x[:, :-1].reshape(8, 4), x[:, 1:].reshape(8, 4)
    logits = during.model(pieces_x, 2)  # (8, 2, V)
    expected_short = torch.nn.functional.cross_entropy(logits.flatten(0, 1), pieces_labels[:, 2:].flatten())
    torch.testing.assert_close(during.training_loss(batch), expected_short)

    logits = after.model(x[:, :-1], 8)  # whole windows: the last 8 of 16 are latents
    expected_long = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 9:].flatten())
    torch.testing.assert_close(after.training_loss(batch), expected_long)
    assert not torch.allclose(expected_short, expected_long)


def test_the_run_config_resolves_the_curriculum():
    base = ["data.max_seq_len=1024", "model.max_latents=256", "trainer.max_steps=1000"]
    cfg, _ = load_run_config("clm-small", [*base, "data.short_seq_len=128"])
    assert cfg.short_windows() == {"seq_len": 128, "latents": 32, "steps": 800}  # max_latents' share; 0.8 by default
    cfg, _ = load_run_config("clm-small", [*base, "data.short_seq_len=128", "data.short_latents=64",
                                           "data.short_fraction=0.25"])
    assert cfg.short_windows() == {"seq_len": 128, "latents": 64, "steps": 250}
    cfg, _ = load_run_config("clm-small", [*base, "data.short_seq_len=128", "data.short_fraction=0"])
    assert cfg.short_windows() is None  # turned off
    assert load_run_config("clm-small", base)[0].short_windows() is None


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["data.short_seq_len=512", "data.short_latents=600"],
         ["data.short_seq_len: must be below data.max_seq_len (512)",
          "data.short_latents: must be at most data.short_seq_len (512) and model.max_latents (128)"]),
        (["data.short_latents=16"], ["data.short_latents: applies with data.short_seq_len"]),
        (["data.short_seq_len=128", "trainer.max_steps=-1", "trainer.max_epochs=1"],
         ["trainer.max_steps: the window curriculum trains short windows for a share of max_steps"]),
        (["data.short_seq_len=128", "data.short_fraction=1.5"], ["data.short_fraction"]),
    ],
)
def test_bad_curricula_exit_2_naming_every_problem(overrides, fragments, capsys):
    args = ["train", "--preset", "clm-small", "--dry-run"]
    for override in overrides:
        args += ["--set", override]
    status, _, err = run_cli(capsys, *args)
    assert status == 2
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_dry_run_shows_the_curriculum(capsys):
    status, out, _ = run_cli(capsys, "train", "--preset", "clm-long", "--dry-run")
    assert status in (0, None)
    assert "window curriculum   steps 1-" in out and "pieces of 512 tokens, 128 latents each" in out


def test_mlm_refuses_the_curriculum(capsys):
    status, _, err = run_cli(capsys, "train", "--preset", "mlm-small", "--dry-run", "--set", "data.short_seq_len=64")
    assert status == 2 and "the window curriculum is for causal LMs" in err


def test_perceiver_train_runs_short_pieces_first_then_whole_windows(capsys, tmp_path, monkeypatch):
    seen = []  # (training, input shape, latents) of each loss computed
    loss = LitCausalLanguageModel.loss

    def recording_loss(self, batch, num_latents=None):
        seen.append((self.training, tuple(batch["input_ids"].shape), num_latents))
        return loss(self, batch, num_latents)

    monkeypatch.setattr(LitCausalLanguageModel, "loss", recording_loss)
    settings = {"data.tokenizer": "utf8", "optimizer.name": "adamw", "data.max_seq_len": 64, "model.max_latents": 16,
                "model.num_channels": 32, "model.num_self_attention_layers": 1, "data.batch_size": 2,
                "data.random_truncation": False, "data.short_seq_len": 16, "data.short_latents": 4,
                "data.short_fraction": 0.5, "trainer.max_steps": 6, "trainer.val_check_interval": 6,
                "trainer.limit_val_batches": 1, "scheduler.warmup_steps": 1, "output.sample_prompt": ""}
    args = ["train", "--preset", "clm-small", "--output", str(tmp_path / "runs")]
    for key, value in settings.items():
        args += ["--set", f"{key}={json.dumps(value) if isinstance(value, str) else str(value).lower()}"]
    status, out, err = run_cli(capsys, *args)
    assert status in (0, None), err
    assert "window curriculum: steps 1-3 on pieces of 16 tokens (4 latents each), then whole 64-token windows" in out
    training = [(shape, latents) for is_training, shape, latents in seen if is_training]
    assert training == [((8, 16), 4)] * 3 + [((2, 64), None)] * 3  # 2 windows of 64 = 8 pieces of 16
    assert all(shape[1] == 64 and latents is None for is_training, shape, latents in seen if not is_training)


def test_padding_only_pieces_never_reach_the_loss():
    lit = tiny_lit({"seq_len": 4, "latents": 2, "steps": 1})
    x = torch.randint(1, 32, (1, 16))
    labels = x.clone()
    pad_mask = torch.zeros(1, 16, dtype=torch.bool)
    pad_mask[0, :12] = True  # one real piece of 4
    labels[pad_mask] = IGNORE_INDEX
    loss = lit.training_loss({"input_ids": x, "labels": labels, "pad_mask": pad_mask})
    assert torch.isfinite(loss)
