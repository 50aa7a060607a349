"""Tokenize, concatenate and chunk: chunk lengths per task, document separators, and the on-disk map cache."""

import time

import pytest
from datasets import Dataset, DatasetDict

from perceiver_cli.data import pipeline
from perceiver_cli.data.pipeline import chunk_length, count_tokens, tokenize_and_chunk
from perceiver_cli.data.sources import load_text_splits
from perceiver_cli.data.tokenizer import load_tokenizer
from perceiver_cli.errors import UserError

EOS, CLS, SEP = 2, 4, 5


@pytest.fixture
def tokenizer():
    return load_tokenizer("utf8")


def _splits(tmp_path, train_docs, validation_docs=("a validation document",)):
    """A file-backed DatasetDict (in-memory datasets are never cached by map)."""
    train = tmp_path / "train.jsonl"
    validation = tmp_path / "validation.jsonl"
    for path, docs in ((train, train_docs), (validation, validation_docs)):
        Dataset.from_dict({"text": list(docs)}).to_json(path)
    return load_text_splits("files", path=str(tmp_path / "*.jsonl"))


def _stream(chunks):
    return [t for row in chunks["input_ids"] for t in row]


def _expected_stream(docs):
    return [t for d in docs for t in [b + 6 for b in d.encode()] + [EOS]]


def test_clm_chunks(tmp_path, tokenizer):
    docs = ["hello world", "", "   ", "second document here", "third"]
    chunks = tokenize_and_chunk(_splits(tmp_path, docs), tokenizer, task="clm", max_seq_len=7)
    train = chunks["train"]
    assert train.column_names == ["input_ids"]
    assert train.features["input_ids"].feature.dtype == "int32"
    lengths = [len(row) for row in train["input_ids"]]
    assert lengths[:-1] == [8] * (len(lengths) - 1) and 2 <= lengths[-1] <= 8  # max_seq_len + 1, last kept
    # documents concatenated in order, each followed by EOS; empty documents dropped
    assert _stream(train) == _expected_stream(["hello world", "second document here", "third"])
    assert count_tokens(train) == sum(lengths)


def test_mlm_chunks_are_wrapped_like_the_fill_mask_pipeline(tmp_path, tokenizer):
    docs = ["some text for masked language modelling", "and more"]
    chunks = tokenize_and_chunk(_splits(tmp_path, docs), tokenizer, task="mlm", max_seq_len=10)
    rows = list(chunks["train"]["input_ids"])
    assert all(row[0] == CLS and row[-1] == SEP for row in rows)
    assert [len(row) for row in rows[:-1]] == [10] * (len(rows) - 1) and len(rows[-1]) <= 10
    assert [t for row in rows for t in row[1:-1]] == _expected_stream(docs)
    # the same framing as tokenizer(text) with special tokens, which is what inference sees
    assert tokenizer("some tex")["input_ids"] == rows[0][:9] + [SEP]


def test_special_token_text_stays_text(tmp_path, tokenizer):
    chunks = tokenize_and_chunk(_splits(tmp_path, ["a [MASK] b", "x"]), tokenizer, task="clm", max_seq_len=64)
    assert 3 not in _stream(chunks["train"])  # the literal "[MASK]" is bytes, not the mask token


def test_last_single_token_clm_chunk_is_dropped(tmp_path, tokenizer):
    # "abcdef" + EOS = 7 tokens = one chunk of 6 (max_seq_len 5) + 1 token, which cannot train anything
    chunks = tokenize_and_chunk(_splits(tmp_path, ["abcdef", "abcdef"]), tokenizer, task="clm", max_seq_len=5)
    assert all(len(row) >= 2 for row in chunks["train"]["input_ids"])
    assert all(len(row) >= 2 for row in chunks["validation"]["input_ids"])


def test_subword_tokenizer_without_eos_separates_documents_with_sep(tmp_path):
    from test_data_collators import _trained_tokenizer

    wordpiece = _trained_tokenizer("wordpiece")
    cls, sep = wordpiece.cls_token_id, wordpiece.sep_token_id
    docs = ["the quick brown fox", "unbelievable transformations"]
    chunks = tokenize_and_chunk(_splits(tmp_path, docs), wordpiece, task="mlm", max_seq_len=64)
    (row,) = chunks["train"]["input_ids"]
    expected = [wordpiece(d, add_special_tokens=False)["input_ids"] + [sep] for d in docs]
    assert row == [cls, *expected[0], *expected[1], sep]


def test_chunk_lengths_by_task(tokenizer):
    assert chunk_length(tokenizer, "clm", 512) == 513
    assert chunk_length(tokenizer, "mlm", 512) == 510


def test_bad_arguments(tmp_path, tokenizer):
    splits = _splits(tmp_path, ["text", "more text"])
    with pytest.raises(UserError, match="unknown task"):
        tokenize_and_chunk(splits, tokenizer, task="seq2seq", max_seq_len=8)
    with pytest.raises(UserError, match="too small"):
        tokenize_and_chunk(splits, tokenizer, task="mlm", max_seq_len=2)


def test_empty_split_is_a_user_error(tmp_path, tokenizer):
    splits = _splits(tmp_path, ["text", "more text"], validation_docs=["", " "])
    with pytest.raises(UserError, match="validation split has no text"):
        tokenize_and_chunk(splits, tokenizer, task="clm", max_seq_len=8)


def test_results_are_cached_on_disk(tmp_path, tokenizer, monkeypatch):
    splits = _splits(tmp_path, [f"document {i} " * 20 for i in range(200)])
    first = tokenize_and_chunk(splits, tokenizer, task="clm", max_seq_len=32)
    assert first["train"].cache_files

    # A second run, even with a freshly loaded tokenizer and freshly loaded splits, must not tokenize again.
    def fail(*args, **kwargs):
        raise AssertionError("tokenized again instead of using the cache")

    monkeypatch.setattr(pipeline._Tokenize, "__call__", fail)
    monkeypatch.setattr(pipeline._Chunk, "__call__", fail)
    again = tokenize_and_chunk(
        load_text_splits("files", path=str(tmp_path / "*.jsonl")), load_tokenizer("utf8"), task="clm", max_seq_len=32
    )
    assert again["train"].cache_files == first["train"].cache_files
    assert list(again["train"]["input_ids"]) == list(first["train"]["input_ids"])


def test_changed_settings_are_not_served_from_the_cache(tmp_path, tokenizer):
    splits = _splits(tmp_path, [f"document {i} " * 20 for i in range(50)])
    short = tokenize_and_chunk(splits, tokenizer, task="clm", max_seq_len=16)
    long = tokenize_and_chunk(splits, tokenizer, task="clm", max_seq_len=32)
    mlm = tokenize_and_chunk(splits, tokenizer, task="mlm", max_seq_len=17)
    assert max(len(r) for r in short["train"]["input_ids"]) == 17
    assert max(len(r) for r in long["train"]["input_ids"]) == 33
    assert list(mlm["train"]["input_ids"])[0][0] == CLS


def test_in_memory_splits_work_too(tokenizer):
    splits = DatasetDict(
        {"train": Dataset.from_dict({"text": ["abc", "de"]}), "validation": Dataset.from_dict({"text": ["f"]})}
    )
    chunks = tokenize_and_chunk(splits, tokenizer, task="clm", max_seq_len=16)
    assert _stream(chunks["validation"]) == _expected_stream(["f"])


def test_embedded_corpus_tokenizes_and_caches(tokenizer):
    splits = load_text_splits("embedded")
    start = time.monotonic()
    tokenize_and_chunk(splits, tokenizer, task="clm", max_seq_len=512)
    first = time.monotonic() - start
    start = time.monotonic()
    chunks = tokenize_and_chunk(splits, tokenizer, task="clm", max_seq_len=512)
    second = time.monotonic() - start
    assert count_tokens(chunks["train"]) > 1_500_000
    assert second < max(1.0, first / 5)
