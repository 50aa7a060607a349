"""Long context survives the whole pipeline: whole-file documents, chunking, training and `perceiver eval`.

A synthetic recall task: each document is one random letter, then three times a gap of 12 dashes, "=" and the
letter again. A model whose window reaches back past the gap (64 tokens) can copy the letter after each "="; one
whose window is 8 tokens (shorter than the gap) can only guess it (4 bits, one of 16). Both are trained for a few
hundred steps by `perceiver train` on a directory of .txt files (`data.document = "file"`) and scored by
`perceiver eval --path`. If any stage cuts the context (documents split, chunks or batches cut short, windows
shortened in training or scoring), the long model cannot copy and the test fails.
"""

import json
import random

from cli_runner import run_cli

LETTERS = "abcdefghijklmnop"


def recall_document(rng: random.Random) -> str:
    letter = rng.choice(LETTERS)
    return letter + ("-" * 12 + "=" + letter) * 3  # 43 bytes: the letter 12 + 2 tokens back, 3 times


def write_corpus(directory, count: int, seed: int) -> None:
    rng = random.Random(seed)
    directory.mkdir()
    for i in range(count):
        (directory / f"{i:04d}.txt").write_text(recall_document(rng), encoding="utf-8")


def train_and_score(capsys, root, name: str, window: int, latents: int) -> float:
    settings = {
        "data.source": "files", "data.path": str(root / "train"), "data.document": "file",
        "data.max_seq_len": window, "model.max_latents": latents, "data.batch_size": 16,
        "data.random_truncation": False,
        # Small, and initialised a little wider than the preset: this size finds the copy within 400 steps.
        "model.num_channels": 64, "model.num_heads": 2, "model.num_self_attention_layers": 1,
        "model.output_norm": False, "model.init_scale": 0.05,
        "data.tokenizer": "utf8", "optimizer.name": "adamw",  # bytes, so that the gap is a number of tokens
        "optimizer.lr": 3e-3, "scheduler.name": "constant", "scheduler.warmup_steps": 20,
        "trainer.max_steps": 400, "trainer.val_check_interval": 400, "trainer.limit_val_batches": 1,
        "output.sample_prompt": "", "output.name": name,
    }
    args = ["train", "--preset", "clm-small", "--output", str(root / "runs")]
    for key, value in settings.items():
        args += ["--set", f"{key}={json.dumps(value) if isinstance(value, str) else str(value).lower()}"]
    status, _, err = run_cli(capsys, *args)
    assert status in (0, None), err
    status, out, err = run_cli(
        capsys, "eval", "--model", str(root / "runs" / name / "version_0"), "--path", str(root / "held-out"), "--json"
    )
    assert status == 0, err
    result = json.loads(out)
    assert result["window"] == window and result["split"] == "all"
    return result["bits_per_byte"]


def test_a_long_window_recalls_what_a_short_window_cannot_see(capsys, tmp_path):
    write_corpus(tmp_path / "train", 1000, seed=0)
    write_corpus(tmp_path / "held-out", 50, seed=1)
    long = train_and_score(capsys, tmp_path, "long", window=64, latents=32)
    short = train_and_score(capsys, tmp_path, "short", window=8, latents=4)
    # Copying the 3 recalled letters costs next to nothing; guessing them costs 3 x 4 bits of each 44 bytes
    # (0.27 bits per byte) on top of what both pay for the first letter.
    assert long < short - 0.2, (long, short)
