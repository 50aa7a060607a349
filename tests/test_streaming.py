"""Streaming (`data.streaming = true`): chunks cut by the map-style rule, each reader its own share, positions that
resume exactly, `perceiver train` on a stream (resume bit-equal, two DDP ranks), and bad streams."""

import json
import logging
import random

import pytest
import torch

from cli_runner import assert_one_error, run_cli
from perceiver_cli.data.collators import MLMCollator
from perceiver_cli.data.datamodule import TextDataModule
from perceiver_cli.data.pipeline import tokenize_and_chunk
from perceiver_cli.data.sources import load_documents
from perceiver_cli.data.streaming import STATE_KEY, ChunkStream, check_stream, stream_splits
from perceiver_cli.data.tokenizer import load_tokenizer
from perceiver_cli.errors import UserError

WORDS = "the quick brown fox jumps over a lazy dog while birds sing in tall green trees by the river".split()
TINY_CLM = [
    "model.num_channels=32", "model.num_heads=4", "model.max_latents=8", "model.num_self_attention_layers=1",
    "model.cross_attention_dropout=0.5",  # draws from torch's global generator every step
    "data.max_seq_len=32", "data.batch_size=4", "data.random_shift=true", "data.random_truncation=true",
    "data.min_seq_len=8", "trainer.val_check_interval=3", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
    "trainer.deterministic=true", 'output.sample_prompt=""', "data.source=files", "data.streaming=true",
    "data.shuffle_buffer=16", "data.tokenizer=utf8",  # a streamed corpus has no whole split to train a BPE on
]


def paragraphs(n: int, seed: int = 0, prefix: str = "") -> list[str]:
    rng = random.Random(seed)
    return [prefix + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three .txt files of 300 paragraphs each: 900 documents, about 150 KB."""
    root = tmp_path_factory.mktemp("stream")
    for i in range(3):
        (root / f"part{i}.txt").write_text("\n\n".join(paragraphs(300, seed=i, prefix=f"{i}: ")) + "\n")
    return root


def stream(source, task="clm", **options):
    tokenizer = load_tokenizer("utf8", "left" if task == "clm" else "right")
    defaults = dict(task=task, max_seq_len=32, batch_size=4, collator=lambda examples: examples)
    return ChunkStream(source, tokenizer, **{**defaults, **options}), tokenizer


def ids(examples) -> list[list[int]]:
    return [list(map(int, e["input_ids"])) for e in examples]


def test_streamed_chunks_are_the_map_pipelines(corpus):
    """One reader, no shuffling: the chunks of the map-style pipeline over the same documents, in order."""
    import datasets

    train, validation = stream_splits("files", path=str(corpus / "*.txt"))
    assert validation is None and len(train.files) == 3
    documents = load_documents("files", path=str(corpus / "*.txt"))  # as the map-style pipeline reads them
    for task in ("clm", "mlm"):
        chunks, tokenizer = stream(train, task)
        streamed = [example for example, _ in chunks._chunks(0, 1, None)]
        mapped = tokenize_and_chunk(datasets.DatasetDict({"train": documents}), tokenizer, task=task,
                                    max_seq_len=32)["train"]
        assert ids(streamed) == [list(x) for x in mapped["input_ids"]]


def test_each_reader_tokenizes_its_own_share_of_the_documents(corpus):
    train, _ = stream_splits("files", path=str(corpus / "*.txt"))
    tokenizer = load_tokenizer("utf8")
    documents = load_documents("files", path=str(corpus / "*.txt"))["text"]
    readers = 3
    for reader in range(readers):
        chunks, _ = stream(train, "mlm", skip=10, documents_per_batch=7)  # mlm: no chunk is dropped
        tokens = [t for e in chunks._chunks(reader, readers, None) for t in map(int, e[0]["input_ids"][1:-1])]
        own = documents[10 + reader :: readers]  # the first 10 are validation's
        expected = [t for text in own for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [2]]
        assert tokens == expected  # every document of its share, once, in order; no other


def test_a_reader_resumes_at_any_batch_with_the_batches_it_would_have_made(corpus):
    """Positions after every batch (several document batches and shuffle blocks, reader 1 of 2), then resumed."""
    train, _ = stream_splits("files", path=str(corpus / "part0.txt"))
    tokenizer = load_tokenizer("utf8", "right")
    collator = MLMCollator(tokenizer, seed=3)

    def batches(position=None):
        chunks, _ = stream(train, "mlm", collator=collator, shuffle_buffer=5, skip=4, documents_per_batch=13,
                           reseed=True, seed=3)
        return list(chunks.batches(1, 2, position))

    reference = batches()
    assert len(reference) > 40
    for k in range(0, len(reference) - 1, 5):
        resumed = batches(reference[k][1])
        assert len(resumed) == len(reference) - k - 1, k
        for (a, _), (b, _) in zip(reference[k + 1 :], resumed):
            assert all(torch.equal(a[key], b[key]) for key in a), k


def test_shuffling_mixes_within_the_buffer_and_differs_between_passes(corpus):
    train, _ = stream_splits("files", path=str(corpus / "*.txt"))
    plain = ids(e for e, _ in stream(train)[0]._shuffled(0, 1, None))
    shuffled_stream, _ = stream(train, shuffle_buffer=64, seed=1)
    first = ids(e for e, _ in shuffled_stream._shuffled(0, 1, None))
    shuffled_stream.start(pass_=1)
    second = ids(e for e, _ in shuffled_stream._shuffled(0, 1, None))
    assert sorted(first) == sorted(plain) == sorted(second) and len(set(map(tuple, plain))) > 100
    assert first != plain and first != second
    assert sorted(first[:64]) == sorted(plain[:64])  # a block of 64 chunks is permuted as a whole


def _consume(loader, n=None, state=None):
    if state is not None:
        loader.load_state_dict(state)
    out = []
    for batch in loader:
        loader.consume(batch.pop(STATE_KEY))
        out.append(batch)
        if len(out) == n:
            break
    return out, loader.state_dict()


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_resumes_from_its_state_dict(corpus, workers):
    dm = TextDataModule("mlm", source="files", path=str(corpus), max_seq_len=32, batch_size=4, streaming=True,
                        shuffle_buffer=8, num_workers=workers, seed=5)
    dm.prepare_data()
    assert dm.describe() == {"validation_documents": 45}  # 5% of 900
    reference, _ = _consume(dm.train_dataloader(), 30)
    head, state = _consume(dm.train_dataloader(), 11)
    assert state["layout"] == [1, max(1, workers)]
    tail, _ = _consume(dm.train_dataloader(), 19, state)
    for a, b in zip(reference, head + tail, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert len(list(dm.val_dataloader())) == len(list(dm.val_dataloader())) > 0  # the same documents every time


def test_validation_is_the_validation_split_or_the_first_documents(corpus, tmp_path):
    for name in ("train.txt", "validation.txt"):
        (tmp_path / name).write_text("\n\n".join(paragraphs(30, seed=len(name), prefix=name)))
    train, validation = stream_splits("files", path=str(tmp_path))
    assert validation is not None and check_stream(train, validation, 0.05, 1000) == 0
    train, validation = stream_splits("files", path=str(corpus))
    assert check_stream(train, None, 0.05, 1000) == 45  # a small corpus: the fraction of its 900 documents
    assert check_stream(train, None, 0.05, 20) == 20  # a large one (at least 20 / 0.05 documents): at most 20
    dm = TextDataModule("clm", source="files", path=str(corpus), max_seq_len=32, batch_size=4, streaming=True,
                        validation_documents=20)
    dm.prepare_data()
    text = b"".join(bytes(int(t) - 6 for t in row if t > 5) for b in dm.val_dataloader() for row in b["input_ids"])
    assert text.startswith(b"0: ") and b"1: " not in text and b"2: " not in text  # from the first file only


def test_unreadable_files_and_rows_are_skipped_mid_stream_and_refused_at_the_start(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("\n\n".join(paragraphs(20, prefix="a ")))
    (tmp_path / "b.txt").write_bytes("caf\xe9 au lait\n\nune autre\n".encode("latin-1"))
    (tmp_path / "c.txt").write_text("\n\n".join(paragraphs(20, prefix="c ")))
    train, _ = stream_splits("files", path=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        examples = [e for e, _ in stream(train, max_seq_len=4000)[0]._chunks(0, 1, None)]
    text = bytes(int(t) - 6 for e in examples for t in e["input_ids"] if t > 5).decode()
    assert "a " in text and "c " in text and "caf" not in text
    assert "skipping the rest of" in caplog.text and "b.txt" in caplog.text
    with pytest.raises(UserError, match="b.txt"):  # the first documents are read before training: an error there
        check_stream(stream_splits("files", path=str(tmp_path / "b.txt"))[0], None, 0.05, 1000)

    rows = [{"text": "first row"}, {"text": None}, {"text": "third row"}, {"text": "fourth row"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, _ = stream_splits("files", path=str(tmp_path / "rows.jsonl"))
    with caplog.at_level(logging.WARNING):
        assert len(list(stream(train)[0]._chunks(0, 1, None))) == 1  # the three texts fit one chunk
    assert "not text" in caplog.text


def train(capsys, runs, *overrides, options=()):
    args = ["train", "--preset", "clm-small", "--output", str(runs), *options]
    for override in TINY_CLM + list(overrides):
        args += ["--set", override]
    return run_cli(capsys, *args)


def last(runs):
    [path] = runs.glob("clm-small/*/checkpoints/last.ckpt")
    return torch.load(path, weights_only=True)


def test_a_resumed_streaming_run_ends_with_the_weights_of_an_uninterrupted_one(corpus, capsys, tmp_path):
    data = f"data.path={corpus}"
    code, out, err = train(capsys, tmp_path / "straight", data, "trainer.max_steps=10")
    assert code in (0, None), err
    assert "streamed" in out and "the first 45 documents set aside" in out
    code, _, err = train(capsys, tmp_path / "resumed", data, "trainer.max_steps=4")
    assert code in (0, None), err
    assert last(tmp_path / "resumed")["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["workers"]
    code, out, err = train(capsys, tmp_path / "resumed", data, "trainer.max_steps=10", options=("--resume", "auto"))
    assert code in (0, None), err
    expected, resumed = last(tmp_path / "straight"), last(tmp_path / "resumed")
    assert expected["global_step"] == resumed["global_step"] == 10
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name  # bit for bit


def test_a_stream_that_runs_dry_stops_with_its_steps_saved(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PERCEIVER_DEBUG", "0")
    corpus = tmp_path / "small.txt"
    corpus.write_text("\n\n".join(paragraphs(16)))
    runs = tmp_path / "runs"
    options = (f"data.path={corpus}", "trainer.max_steps=500", "trainer.val_check_interval=5")
    code, out, err = train(capsys, runs, *options)
    assert_one_error(code, err, "ran out after", out)
    assert "trainer.max_epochs" in err and "is saved" in err
    steps = last(runs)["global_step"]
    assert 5 < steps < 500 and f"ran out after {steps} steps" in err
    # A second pass is what max_epochs asks for; the run goes on from where it stopped.
    code, _, err = train(capsys, runs, *options, "trainer.max_epochs=2", options=("--resume", "auto"))
    assert code in (0, None), err
    assert last(runs)["global_step"] == 2 * steps  # the second pass: the same chunks, shuffled anew


@pytest.mark.parametrize("case", ["empty", "missing column", "not UTF-8", "embedded", "epoch fraction", "hub"])
def test_bad_streams_exit_2_before_training(case, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PERCEIVER_DEBUG", "0")
    files = {
        "empty": ("blank.jsonl", "".join(json.dumps({"text": "  "}) + "\n" for _ in range(5)), "no text found"),
        "missing column": ("rows.jsonl", json.dumps({"body": "text"}) + "\n", "column 'text' not found"),
        "not UTF-8": ("latin1.txt", "caf\xe9\n\nau lait\n", "latin1.txt"),
    }
    overrides = []
    if case in files:
        name, text, fragment = files[case]
        (tmp_path / name).write_bytes(text.encode("latin-1"))
        overrides = [f"data.path={tmp_path / name}"]
    elif case == "hub":  # the tests run offline: neither the Hub nor a local copy
        overrides, fragment = ["data.source=hub", "data.name=wikitext", "data.config_name=wikitext-2-raw-v1"], "wikitext"
    elif case == "embedded":
        overrides, fragment = ["data.source=embedded"], 'data.streaming: applies to source = "files" or "hub"'
    else:
        overrides, fragment = [f"data.path={tmp_path}", "trainer.val_check_interval=0.5"], "no known length"
    code, out, err = train(capsys, tmp_path / "runs", *overrides, "trainer.max_steps=2")
    assert_one_error(code, err, fragment, out)
    assert not list((tmp_path / "runs").glob("clm-small/*"))  # nothing started, nothing left behind


def test_two_ddp_ranks_stream_their_own_shards_and_end_the_pass_together(corpus, tmp_path):
    import os
    import subprocess
    import sys

    from test_distributed import free_port

    args = [sys.executable, "-m", "perceiver_cli", "train", "--preset", "clm-small", "--output", str(tmp_path)]
    for override in TINY_CLM + [f"data.path={corpus / 'part0.txt'}", "trainer.max_epochs=1", "trainer.strategy=ddp",
                                "trainer.devices=2", "trainer.accelerator=cpu", "trainer.val_check_interval=1.0"]:
        args += ["--set", override]
    env = {**os.environ, "MASTER_PORT": free_port(), "PERCEIVER_DEBUG": "0"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = last(tmp_path)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["layout"] == [2, 1]
    # Rank r read documents 15 + r, 17 + r, ... (the first 15 of 300 are validation's); the pass ended on both
    # ranks when the one with fewer batches ran out.
    train, _ = stream_splits("files", path=str(corpus / "part0.txt"))
    chunks = [sum(1 for _ in stream(train, skip=15)[0]._chunks(rank, 2, None)) for rank in range(2)]
    assert state["global_step"] == min(-(-n // 4) for n in chunks)
