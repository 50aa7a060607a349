"""The embedded corpus: real English prose from the standard library, built deterministically and cached."""

import json
import re
import sys
from collections import Counter

import pytest

from perceiver_cli.config import validate
from perceiver_cli.data import corpus
from perceiver_cli.errors import UserError


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


# --- the long-document corpora: "modules" and "code" ----------------------------------------------------------


def _documents(files):
    return {split: _read(file) for split, file in files.items()}


@pytest.fixture(scope="module")
def modules():
    return _documents(corpus.embedded_corpus_files("modules"))  # about 5 s


@pytest.fixture(scope="module")
def code():
    return _documents(corpus.embedded_corpus_files("code"))  # about 1 s: the stdlib's files, read whole


def _sizes(documents):
    return sorted(len(text.encode()) for split in documents.values() for text in split)


@pytest.mark.parametrize("name", ["modules", "code"])
def test_long_corpora_are_split_by_hash_and_cached_apart(name, request):
    documents = request.getfixturevalue(name)
    train, validation = documents["train"], documents["validation"]
    assert len(validation) >= 10 and len(train) > 10 * len(validation)
    assert not set(train) & set(validation) and len(set(train)) == len(train)
    assert all(corpus.split_of(t) == "train" for t in train)
    assert all(corpus.split_of(t) == "validation" for t in validation)
    directories = {n: corpus.embedded_corpus_files(n)["train"].parent for n in ("prose", "modules", "code")}
    assert len(set(directories.values())) == 3
    assert directories[name].name.startswith(f"stdlib-{name}-py")
    assert corpus.embedded_corpus_files(None) == corpus.embedded_corpus_files("prose")  # the default, its old key
    assert directories["prose"].name.startswith("stdlib-py")
    assert "\n" not in corpus.describe_embedded_corpus(name) and f"'{name}'" in corpus.describe_embedded_corpus(name)


def test_modules_corpus_groups_the_prose_by_file(modules):
    sizes = _sizes(modules)
    assert 300 < len(sizes) < 2000
    assert sizes[len(sizes) // 2] > 1_000 and sum(sizes) / len(sizes) > 3_000 and sizes[-1] > 20_000
    texts = set(modules["train"]) | set(modules["validation"])
    textwrap_prose = [d for d in corpus._file_documents(corpus._stdlib_root() / "textwrap.py") if corpus._keep(d)]
    assert len(textwrap_prose) > 5 and "\n\n".join(textwrap_prose) in texts  # in source order, blank lines between
    from pydoc_data.topics import topics

    assert topics["if"].strip() in texts  # a reference topic, whole
    assert sum(sizes) > 2_000_000  # all the prose is still there


def test_code_corpus_has_whole_source_files(code):
    sizes = _sizes(code)
    assert 500 < len(sizes) < 1500 and sum(sizes) > 5_000_000
    assert sizes[len(sizes) // 2] > 2_000 and sizes[-1] <= corpus.MAX_FILE_BYTES
    texts = set(code["train"]) | set(code["validation"])
    for name in ("textwrap.py", "json/decoder.py"):
        assert (corpus._stdlib_root() / name).read_bytes().decode("utf-8") in texts
    test_file = corpus._stdlib_root() / "test" / "test_textwrap.py"
    if test_file.is_file():  # test directories are skipped (some Python installs leave them out anyway)
        assert test_file.read_bytes().decode("utf-8") not in texts


def test_code_corpus_leaves_out_what_is_not_a_source_file(tmp_path, monkeypatch):
    good = "def f():\n    return 1\n" * 10
    (tmp_path / "good.py").write_text(good)
    (tmp_path / "tiny.py").write_text("x = 1\n")
    (tmp_path / "latin1.py").write_bytes(("# caf\xe9\n" + good).encode("latin-1"))
    (tmp_path / "huge.py").write_text(good * 10)
    monkeypatch.setattr(corpus, "MAX_FILE_BYTES", len(good) * 5)
    assert corpus.source_document(tmp_path / "good.py") == good
    for name in ("tiny.py", "latin1.py", "huge.py"):
        assert corpus.source_document(tmp_path / name) is None, name


def test_unknown_corpus_name_is_a_user_error():
    message = "unknown embedded corpus 'poems': set data.name to one of prose, modules, code"
    with pytest.raises(UserError, match=message):
        corpus.embedded_corpus_files("poems")
    with pytest.raises(UserError, match="unknown embedded corpus 'poems'"):
        corpus.describe_embedded_corpus("poems")


def test_config_validation_checks_the_embedded_corpus_name():
    def preset(max_time=None, **data):
        return {"model": {"task": "clm"}, "data": data, "trainer": {"max_steps": 1, "max_time": max_time}}

    with pytest.raises(UserError) as error:
        validate(preset(source="embedded", name="poems", max_time="soon"), "test preset")
    assert "2 problems" in str(error.value)  # reported together with the other problems
    assert "data.name: unknown embedded corpus 'poems': use one of prose, modules, code" in str(error.value)
    assert "trainer.max_time: expected DD:HH:MM:SS" in str(error.value)
    for name in (None, "prose", "modules", "code"):
        assert validate(preset(source="embedded", name=name), "test preset").data.name == name
    assert validate(preset(source="hub", name="poems"), "test preset").data.name == "poems"  # a hub dataset name
