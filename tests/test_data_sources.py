"""Text sources: local files of every supported format, errors that name the fix, and the Hub failing fast offline."""

import json
import time

import datasets
import pandas as pd
import pytest

from perceiver_cli.data import sources
from perceiver_cli.data.sources import load_text_splits
from perceiver_cli.errors import UserError

DOCS = [f"Document number {i} talks about topic {i % 7} at some length." for i in range(40)]


def _splits_text(splits):
    # stripped: the text builder keeps the final newline of a .txt file's last paragraph
    return sorted(t.strip() for t in list(splits["train"]["text"]) + list(splits["validation"]["text"]))


def _write(tmp_path, fmt, docs=DOCS, column="text", name="data"):
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "txt":
        path.write_text("\n\n".join(docs) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    elif fmt == "parquet":
        pd.DataFrame({column: docs, "id": range(len(docs))}).to_parquet(path)
    elif fmt == "csv":
        pd.DataFrame({column: docs, "id": range(len(docs))}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet", "csv"])
def test_files_of_each_format_load(tmp_path, fmt):
    column = "text" if fmt == "txt" else "body"
    path = _write(tmp_path, fmt, column=column)
    splits = load_text_splits("files", path=str(path), text_column=column, validation_fraction=0.1)
    assert set(splits) == {"train", "validation"}
    for split in splits.values():
        assert split.column_names == ["text"]
    assert _splits_text(splits) == sorted(DOCS)
    assert splits["validation"].num_rows == 4
    assert splits["train"].cache_files  # backed by arrow files, so tokenization is cached too


def test_txt_documents_are_paragraphs(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First paragraph,\nwrapped over lines.\n\nSecond paragraph.\n\nThird.\n")
    splits = load_text_splits("files", path=str(path), validation_fraction=0.34)
    assert _splits_text(splits) == ["First paragraph,\nwrapped over lines.", "Second paragraph.", "Third."]


def test_split_is_deterministic_and_seeded(tmp_path):
    path = _write(tmp_path, "jsonl")
    first = list(load_text_splits("files", path=str(path), seed=1)["validation"]["text"])
    again = list(load_text_splits("files", path=str(path), seed=1)["validation"]["text"])
    other = list(load_text_splits("files", path=str(path), seed=2)["validation"]["text"])
    assert first == again
    assert first != other


def test_directory_and_glob(tmp_path):
    _write(tmp_path, "txt", DOCS[:20], name="a")
    _write(tmp_path, "txt", DOCS[20:], name="b")
    (tmp_path / ".hidden.txt").write_text("never read")
    assert _splits_text(load_text_splits("files", path=str(tmp_path))) == sorted(DOCS)
    assert len(_splits_text(load_text_splits("files", path=str(tmp_path / "a.*")))) == 20


def test_directory_with_validation_files(tmp_path):
    _write(tmp_path, "jsonl", DOCS[:30], name="train")
    _write(tmp_path, "jsonl", DOCS[30:35], name="validation")
    _write(tmp_path, "jsonl", DOCS[35:], name="test")  # left out: it is neither
    splits = load_text_splits("files", path=str(tmp_path))
    assert sorted(list(splits["train"]["text"])) == sorted(DOCS[:30])
    assert sorted(list(splits["validation"]["text"])) == sorted(DOCS[30:35])


def test_missing_column_lists_available_columns(tmp_path):
    path = _write(tmp_path, "jsonl", column="body")
    with pytest.raises(UserError, match=r"column 'text' not found .*: set text_column to one of body, id"):
        load_text_splits("files", path=str(path))


def test_non_text_column_is_rejected(tmp_path):
    path = _write(tmp_path, "csv")
    with pytest.raises(UserError, match="does not hold text"):
        load_text_splits("files", path=str(path), text_column="id")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("missing.txt", "does not exist"),
        ("*.parquet", "no files match"),
        ("empty_dir", "no .txt, .jsonl"),
    ],
)
def test_missing_inputs_are_user_errors(tmp_path, path, message):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match=message):
        load_text_splits("files", path=str(tmp_path / path))


def test_empty_and_tiny_files_are_user_errors(tmp_path):
    for name, content in (("empty.txt", ""), ("blank.txt", "\n\n\n"), ("empty.jsonl", "")):
        (tmp_path / name).write_text(content)
        with pytest.raises(UserError, match="no text found .*: the files are empty"):
            load_text_splits("files", path=str(tmp_path / name))
    (tmp_path / "one.txt").write_text("Just one paragraph.\n")
    with pytest.raises(UserError, match="too few to split off a validation set"):
        load_text_splits("files", path=str(tmp_path / "one.txt"))


def test_malformed_file_names_the_cause(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": [1, \n')
    with pytest.raises(UserError, match=r"could not read .* as json files \(.+\): check the file format"):
        load_text_splits("files", path=str(tmp_path / "bad.jsonl"))


def test_mixed_and_unsupported_file_types(tmp_path):
    _write(tmp_path, "txt")
    _write(tmp_path, "csv")
    with pytest.raises(UserError, match="mixes file types"):
        load_text_splits("files", path=str(tmp_path))
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(UserError, match="unsupported file type .xml"):
        load_text_splits("files", path=str(tmp_path / "data.xml"))


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="unknown data source 'web'"):
        load_text_splits("web")
    with pytest.raises(UserError, match="needs a path"):
        load_text_splits("files")
    with pytest.raises(UserError, match="needs a dataset name"):
        load_text_splits("hub")
    with pytest.raises(UserError, match="validation fraction"):
        load_text_splits("embedded", validation_fraction=1.5)


def test_embedded_source():
    splits = load_text_splits("embedded")
    assert splits["train"].num_rows > 3000 and splits["validation"].num_rows > 100
    assert splits["train"].column_names == ["text"]
    assert splits["train"].cache_files


def test_hub_offline_fails_fast_with_a_clear_error():
    start = time.monotonic()
    with pytest.raises(UserError, match=r"could not load dataset 'wikitext' \(wikitext-103-raw-v1\) .* no network"):
        load_text_splits("hub", name="wikitext", config="wikitext-103-raw-v1")
    assert time.monotonic() - start < 10


def test_hub_probe_has_a_hard_deadline(monkeypatch):
    # A Hub that never answers (dropped packets, a stuck DNS lookup) must not hang the probe.
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda *args, **kwargs: time.sleep(30))
    start = time.monotonic()
    assert sources.hub_status("wikitext", timeout=0.5) == "unreachable"
    assert time.monotonic() - start < 3


def test_hub_dataset_in_local_cache_loads_offline(tmp_path, monkeypatch):
    # Lay out a dataset the way `datasets` caches a Hub download, then load it by name with no network.
    from datasets.packaged_modules.json.json import Json

    source = tmp_path / "src.jsonl"
    source.write_text("".join(json.dumps({"content": d}) + "\n" for d in DOCS))
    cache = tmp_path / "hf-datasets"
    builder = Json(cache_dir=str(cache), dataset_name="tinyset", config_name="plain", hash="0", data_files=str(source))
    builder.download_and_prepare()
    (cache / "tinyset" / builder.config_id).rename(cache / "tinyset" / "plain")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))

    splits = load_text_splits("hub", name="tinyset", config="plain", text_column="content", validation_fraction=0.25)
    assert _splits_text(splits) == sorted(DOCS)
    assert splits["validation"].num_rows == 10

    with pytest.raises(UserError, match="not in the local cache") as error:
        load_text_splits("hub", name="tinyset", config="other", text_column="content")
    assert "plain" in error.value.hint  # the configs that are cached
