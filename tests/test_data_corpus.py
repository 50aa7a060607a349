"""The embedded corpus: real English prose from the standard library, built deterministically and cached."""

import json
import re
import sys
from collections import Counter

import pytest

from perceiver_cli.data import corpus


def _read(path):
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def files():
    # Built once per test session into the session's PERCEIVER_CACHE (see conftest.py); about 3 s.
    return corpus.embedded_corpus_files()


def test_corpus_is_large_and_split(files):
    assert set(files) == {"train", "validation"}
    train, validation = _read(files["train"]), _read(files["validation"])
    train_bytes = sum(len(t.encode()) for t in train)
    validation_bytes = sum(len(t.encode()) for t in validation)
    assert train_bytes + validation_bytes >= 1_500_000
    assert 0.02 < validation_bytes / (train_bytes + validation_bytes) < 0.10
    assert not set(train) & set(validation)
    assert len(set(train)) == len(train)  # duplicates are kept once
    assert all(corpus.split_of(t) == "train" for t in train)
    assert all(corpus.split_of(t) == "validation" for t in validation)


def test_corpus_is_natural_language(files):
    text = "\n".join(_read(files["train"]))
    letters_and_spaces = sum(c.isascii() and (c.isalpha() or c.isspace()) for c in text)
    assert letters_and_spaces / len(text) > 0.85
    words = re.findall(r"[a-z]+", text.lower())
    common = {"the", "of", "and", "to", "is", "a", "in", "that", "if", "this"}
    frequent = {w for w, _ in Counter(words).most_common(20)}
    assert len(common & frequent) >= 7
    assert "The \"if\" statement" in text or "if_stmt" in text  # the language reference is in


def test_corpus_build_is_deterministic(files, tmp_path, monkeypatch):
    monkeypatch.setenv("PERCEIVER_CACHE", str(tmp_path))
    rebuilt = corpus.embedded_corpus_files()
    assert rebuilt["train"].parent != files["train"].parent
    for split in files:
        assert rebuilt[split].read_bytes() == files[split].read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))  # temp files were renamed or removed


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    from perceiver_cli.data.cache import cache_root

    monkeypatch.delenv("PERCEIVER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "perceiver"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root().parts[-2:] == (".cache", "perceiver")


def test_describe_names_sizes(files):
    line = corpus.describe_embedded_corpus()
    assert "\n" not in line
    assert re.search(r"train \d+\.\d\d MB in [\d,]+ documents, validation \d+\.\d\d MB in [\d,]+ documents", line)


def test_no_module_is_imported_to_read_it():
    for name in ("antigravity", "this"):
        sys.modules.pop(name, None)
    corpus._file_documents(corpus._stdlib_root() / "this.py")
    corpus._file_documents(corpus._stdlib_root() / "antigravity.py")
    assert "this" not in sys.modules and "antigravity" not in sys.modules


def test_comment_blocks_skip_strings():
    source = b'x = 1\n# first line of a comment\n# second line\ns = """\n# not a comment\n"""\n'
    blocks = corpus._comment_blocks(source, inside_strings={5})
    assert blocks == [(2, "first line of a comment\nsecond line")]
