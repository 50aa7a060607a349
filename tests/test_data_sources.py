"""Text sources: local files of every supported format, errors that name the fix, and the Hub failing fast offline."""

import json
import re
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


# --- data.document: what one document of a .txt file is ------------------------------------------------------------

LONG_FILES = {
    "alpha.txt": "Alpha opens here.\n\nA second paragraph of alpha,\nwrapped over two lines.\n\n\nAlpha ends.\n",
    "beta.txt": "Beta is one paragraph\nof three\nlines.\n",
    "gamma.txt": "Gamma starts.\n\n   \n\nGamma, after blank and whitespace-only lines.\n",
}


def _long_files(tmp_path, files=LONG_FILES):
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return str(tmp_path)


def _all_text(splits):
    return sorted(list(splits["train"]["text"]) + list(splits["validation"]["text"]))


def test_document_file_keeps_each_txt_file_whole(tmp_path):
    splits = load_text_splits("files", path=_long_files(tmp_path), document="file", validation_fraction=0.3)
    assert _all_text(splits) == sorted(LONG_FILES.values())  # unchanged: blank lines and final newline kept


def test_document_line_gives_one_document_per_non_empty_line(tmp_path):
    splits = load_text_splits("files", path=_long_files(tmp_path), document="line")
    lines = [line for text in LONG_FILES.values() for line in text.splitlines() if line.strip()]
    assert _all_text(splits) == sorted(lines)


def test_document_paragraph_is_the_default(tmp_path):
    path = _long_files(tmp_path)
    default = load_text_splits("files", path=path)
    assert _all_text(load_text_splits("files", path=path, document="paragraph")) == _all_text(default)
    # each "\n\n" ends a paragraph, as in the datasets text builder (which keeps a whitespace-only one)
    assert _all_text(default) == sorted([
        "Alpha opens here.", "A second paragraph of alpha,\nwrapped over two lines.", "\nAlpha ends.\n",
        "Beta is one paragraph\nof three\nlines.\n",
        "Gamma starts.", "   ", "Gamma, after blank and whitespace-only lines.\n",
    ])  # fmt: skip


def test_document_other_than_paragraph_needs_txt_files(tmp_path):
    path = _write(tmp_path, "jsonl")
    for document in ("file", "line"):
        with pytest.raises(UserError, match=r"data.document applies to .txt files, not to .jsonl files"):
            load_text_splits("files", path=str(path), document=document)
    with pytest.raises(UserError, match=r"data.document applies to .txt files .* not to source 'embedded'"):
        load_text_splits("embedded", document="file")
    with pytest.raises(UserError, match=r"unknown data.document 'page': use one of paragraph, line, file"):
        load_text_splits("files", path=str(path), document="page")


def test_document_file_with_one_file_says_to_add_files(tmp_path):
    (tmp_path / "only.txt").write_text("One file.\n\nTwo paragraphs, but one document.\n")
    with pytest.raises(UserError, match="only 1 document found.*add more files"):
        load_text_splits("files", path=str(tmp_path / "only.txt"), document="file")


def test_whole_file_reaches_the_clm_chunker_whole(tmp_path):
    from perceiver_cli.data.pipeline import tokenize_and_chunk
    from perceiver_cli.data.tokenizer import encode_text, load_tokenizer

    tokenizer = load_tokenizer("utf8")
    eos = tokenizer.eos_token_id
    paragraphs = [f"Paragraph {i} of a long document: " + "word " * (10 + i % 7) + "end." for i in range(32)]
    text = "\n\n".join(paragraphs) + "\n"
    assert len(text.encode()) > 3000 and "\n\n" in text
    assert (len(text.encode()) + 1) % 257 > 1  # no last chunk of one token, which the chunker would drop
    (tmp_path / "long.txt").write_text(text)
    (tmp_path / "validation.txt").write_text("A short validation document.\n")

    def train_stream(document):
        splits = load_text_splits("files", path=str(tmp_path), document=document)
        chunks = tokenize_and_chunk(splits, tokenizer, task="clm", max_seq_len=256)
        return [t for row in chunks["train"]["input_ids"] for t in row]  # the chunks, back to back

    stream = train_stream("file")
    assert stream == encode_text(tokenizer, [text])[0] + [eos]  # one contiguous stream, in order
    assert stream.count(eos) == 1  # the end-of-text token only after the document
    assert train_stream("paragraph").count(eos) == len(paragraphs)  # what "file" avoids: one after each paragraph


def test_config_validation_checks_document():
    from perceiver_cli.config import validate

    def preset(**data):
        return {"model": {"task": "clm"}, "data": data, "trainer": {"max_steps": 1}}

    assert validate(preset(source="files", path="corpus/*.txt", document="file"), "p").data.document == "file"
    assert validate(preset(source="files", path="corpus/", document="line"), "p").data.document == "line"
    assert validate(preset(), "p").data.document == "paragraph"
    jsonl = dict(source="files", path="rows/*.jsonl", document="line")
    for data, message in (
        (jsonl, "data.document: applies to .txt files, not to .jsonl files"),
        (dict(source="embedded", document="line"), 'data.document: applies to .txt files of source = "files"'),
        (dict(source="files", path="a.txt", document="page"), "data.document: Input should be 'paragraph', 'line'"),
    ):
        with pytest.raises(UserError, match=re.escape(message)):
            validate(preset(**data), "p")


def test_embedded_source_by_corpus_name():
    from perceiver_cli.data.corpus import embedded_corpus_files

    splits = load_text_splits("embedded", name="modules")
    files = embedded_corpus_files("modules")
    for split in ("train", "validation"):
        assert splits[split].num_rows == len(files[split].read_text(encoding="utf-8").splitlines())
    with pytest.raises(UserError, match="unknown embedded corpus 'poems'"):
        load_text_splits("embedded", name="poems")
