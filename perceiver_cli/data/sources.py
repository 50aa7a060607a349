"""Where training text comes from: an embedded corpus, local files, or a Hugging Face Hub dataset.

Every source ends up as a `DatasetDict` with a "train" and a "validation" split, each with one string column `text`
(one row per document). All of them are backed by arrow cache files, so the tokenization that follows
(`pipeline.tokenize_and_chunk`) is cached by `datasets` too. A document is what the tokenizer's end-of-text token
follows, so long documents stay whole only if they are one row: `document` chooses what one is in .txt files (a
paragraph, a line, or the whole file), and the "modules" and "code" embedded corpora have documents of whole files.
"""

import glob
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from perceiver_cli.data.cache import datasets_cache_dir
from perceiver_cli.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

SOURCES = ("embedded", "files", "hub")
# file suffix -> `datasets` builder
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_VALIDATION_NAME = re.compile(r"^(validation|valid|val|dev)([._-].*)?$", re.IGNORECASE)
_TEST_NAME = re.compile(r"^(test|testing)([._-].*)?$", re.IGNORECASE)
HUB_PROBE_TIMEOUT_S = 3.0
# data.document (what one document of a .txt file is) -> the `datasets` text builder's `sample_by`
DOCUMENTS = {"paragraph": "paragraph", "line": "line", "file": "document"}
# what to add when a source has too few documents to split, per data.document
_MORE_DOCUMENTS = {
    "paragraph": "add more text (in .txt files, separate documents with a blank line)",
    "line": "add more lines (with data.document = \"line\", each non-empty line is a document)",
    "file": "add more files (with data.document = \"file\", each .txt file is one document)",
}


def load_text_splits(
    source: str,
    *,
    path: str | None = None,
    name: str | None = None,
    config: str | None = None,
    text_column: str = "text",
    validation_fraction: float = 0.05,
    seed: int = 0,
    document: str = "paragraph",
) -> "DatasetDict":
    """Load `source` as a DatasetDict with "train" and "validation" splits of one column, `text`.

    - "embedded": the corpus `name` of `perceiver_cli.data.corpus` ("prose", "modules" or "code"; None: "prose";
      no download).
    - "files": `path` is a file, a directory or a glob of .txt, .jsonl/.json, .parquet or .csv files (one kind).
      In .txt files a document is, by `document`, a "paragraph" (text between blank lines), a "line" (blank lines
      are left out) or the whole "file"; in the others, a row's `text_column` (and `document` must be left at
      "paragraph").
      In a directory, files named validation*/valid*/val*/dev* form the validation split (test* files are then
      left out); otherwise `validation_fraction` of the documents is split off, shuffled with `seed`.
    - "hub": `datasets.load_dataset(name, config)`, served from the local Hugging Face cache when the Hub cannot be
      reached; a missing "validation" split is split off as for files.
    """
    if not 0 < validation_fraction < 1:
        raise UserError(f"validation fraction {validation_fraction} is out of range: use a number between 0 and 1")
    if document not in DOCUMENTS:
        raise UserError(f"unknown data.document {document!r}: use one of {', '.join(DOCUMENTS)}")
    if document != "paragraph" and source != "files":
        raise UserError(
            f"data.document applies to .txt files of source 'files', not to source {source!r}: leave it unset"
        )
    if source == "embedded":
        splits = _load_embedded(name)
    elif source == "files":
        if not path:
            raise UserError("source 'files' needs a path: set path to a text file, a directory or a glob")
        splits = _load_files(path, text_column, document)
    elif source == "hub":
        if not name:
            raise UserError("source 'hub' needs a dataset name: set name (e.g. 'wikitext') and config if it has one")
        splits = _load_hub(name, config, text_column)
    else:
        raise UserError(f"unknown data source {source!r}: use one of {', '.join(SOURCES)}")
    return _with_validation(splits, validation_fraction, seed, _MORE_DOCUMENTS[document])


def _load_embedded(name: str | None):
    import datasets

    from perceiver_cli.data.corpus import embedded_corpus_files

    files = {split: str(file) for split, file in embedded_corpus_files(name).items()}
    return datasets.load_dataset("json", data_files=files, cache_dir=str(datasets_cache_dir()))


# --- local files -----------------------------------------------------------------------------------------------


def _load_files(path: str, text_column: str, document: str = "paragraph", *, by_name: bool = True):
    # by_name: validation*/test* files make the splits; False: every file in "train" (`load_documents`)
    import datasets

    files = _resolve_files(path)
    builder, options = files_builder(files, path, document)
    try:
        splits = datasets.load_dataset(
            builder, data_files=_split_files(files) if by_name else {"train": files},
            cache_dir=str(datasets_cache_dir()), **options,
        )
    except Exception as e:  # a malformed file surfaces as one of many datasets/pyarrow errors
        raise UserError(f"could not read {path!r} as {builder} files ({_reason(e)}): check the file format") from e
    if builder != "text":
        splits = _select_text_column(splits, text_column, where=repr(path))
    elif document != "paragraph":
        splits = splits.filter(_has_text, batched=True, desc="Dropping blank documents")  # blank lines, blank files
    if splits["train"].num_rows == 0:
        raise UserError(f"no text found in {path!r}: the files are empty")
    return splits


def files_builder(files: list[str], path: str, document: str = "paragraph") -> tuple[str, dict]:
    """The `datasets` builder that reads `files` (found at `path`) and its options; refuses what it cannot read."""
    suffixes = sorted({Path(f).suffix.lower() for f in files})
    unsupported = [s or "(none)" for s in suffixes if s not in BUILDERS]
    if unsupported:
        raise UserError(
            f"unsupported file type {', '.join(unsupported)} in {path!r}: use {', '.join(BUILDERS)} files"
        )
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise UserError(f"{path!r} mixes file types ({', '.join(suffixes)}): point it at files of one type")
    builder = builders.pop()
    if builder != "text" and document != "paragraph":
        raise UserError(
            f"data.document applies to .txt files, not to {', '.join(suffixes)} files (each row already is one "
            "document): leave data.document unset"
        )
    if all(_is_blank(f) for f in files):
        raise UserError(f"no text found in {path!r}: the files are empty")
    # Paragraphs by default, not lines: with one row per line, wrapped prose would get an end-of-text token after
    # every line. Whole files ("document") keep long documents whole, blank lines and all.
    return builder, ({"sample_by": DOCUMENTS[document]} if builder == "text" else {})


def _has_text(batch: dict) -> list[bool]:
    return [bool(text.strip()) for text in batch["text"]]


def _resolve_files(path: str) -> list[str]:
    expanded = os.path.expanduser(path)
    if glob.has_magic(expanded):
        candidates = glob.glob(expanded, recursive=True)
        if not candidates:
            raise UserError(f"no files match {path!r}: check the pattern")
    elif os.path.isdir(expanded):
        candidates = glob.glob(os.path.join(expanded, "**", "*"), recursive=True)
        candidates = [f for f in candidates if Path(f).suffix.lower() in BUILDERS]
        if not candidates:
            raise UserError(f"no {', '.join(BUILDERS)} files in directory {path!r}: add some or point to a file")
    elif os.path.isfile(expanded):
        candidates = [expanded]
    else:
        raise UserError(f"data path {path!r} does not exist: point it at a text file, a directory or a glob")
    # Hidden files (.DS_Store, editor backups) are never data.
    files = sorted(os.path.abspath(f) for f in candidates if os.path.isfile(f) and not Path(f).name.startswith("."))
    if not files:
        raise UserError(f"no files match {path!r}: check the pattern")
    return files


def _is_blank(file: str) -> bool:
    # Small files only: reading a large file just to find it has text would be wasted work.
    size = os.path.getsize(file)
    if size > 1 << 16:
        return False
    with open(file, "rb") as f:
        return not f.read().strip()


def _split_files(files: list[str]) -> dict[str, list[str]]:
    validation = [f for f in files if _VALIDATION_NAME.match(Path(f).stem)]
    if not validation:
        return {"train": files}
    train = [f for f in files if not _VALIDATION_NAME.match(Path(f).stem) and not _TEST_NAME.match(Path(f).stem)]
    if not train:
        names = ", ".join(os.path.basename(f) for f in validation)
        raise UserError(f"only validation files found ({names}): add training files next to them")
    return {"train": train, "validation": validation}


# --- the Hugging Face Hub ----------------------------------------------------------------------------------------


def _load_hub(name: str, config: str | None, text_column: str, streaming: bool = False):
    # streaming: IterableDatasets (data/streaming.py), read from the Hub as they are iterated, or from the local cache
    # when the Hub cannot be reached.
    import datasets

    what = f"{name!r}" + (f" ({config})" if config else "")
    status = hub_status(name)
    try:
        # Unless the Hub answered for this dataset, `datasets` may only use its local cache: online, it would retry
        # an unreachable Hub for a minute or more (or hang where packets are dropped) before failing.
        with _offline(status != "online"):
            splits = datasets.load_dataset(name, config, streaming=streaming and status == "online")
    except Exception as e:
        reason = {
            "online": _reason(e),
            "missing": "not on the Hub (or it needs a login) and not in the local cache",
            "unreachable": "no network and not in the local cache",
        }[status]
        fix = {
            "online": "check the name and config on https://huggingface.co/datasets",
            "missing": 'check the name, log in with `hf auth login`, or use source = "files"',
            "unreachable": 'download it on a machine with network access or use source = "files"',
        }[status]
        raise UserError(
            f"could not load dataset {what} from the Hugging Face Hub: {reason}; {fix}", hint=_reason(e)
        ) from e
    kinds = (datasets.DatasetDict, datasets.IterableDatasetDict)
    if not isinstance(splits, kinds) or "train" not in splits:
        raise UserError(f"dataset {what} has no 'train' split: pick a dataset or config that has one")
    splits = type(splits)({k: splits[k] for k in ("train", "validation") if k in splits})
    if streaming and isinstance(splits, datasets.DatasetDict):  # from the local cache
        splits = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in splits.items()})
    return _select_text_column(splits, text_column, where=f"dataset {what}")


def hub_status(name: str, timeout: float = HUB_PROBE_TIMEOUT_S, repo_type: str = "dataset") -> str:
    """"online" if the Hub describes dataset `name` (or the repository of `repo_type`, e.g. "model") within about
    `timeout` seconds, "missing" if the Hub answers that it does not exist (or is gated), else "unreachable" (also
    at once when HF_HUB_OFFLINE=1 is set).

    A TCP connect is not enough of a test: sandboxes and corporate proxies accept connections to any address. The
    probe uses the same HTTP stack (proxy, certificates, token, HF_ENDPOINT) as the download that follows, and runs
    in a thread with a hard deadline, because name resolution is not covered by HTTP timeouts."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return "unreachable"
    answer = ["unreachable"]

    def probe() -> None:
        try:
            getattr(HfApi(), f"{repo_type}_info")(name, timeout=timeout)  # dataset_info, model_info
            answer[0] = "online"
        except RepositoryNotFoundError:  # includes GatedRepoError
            answer[0] = "missing"
        except Exception:  # connection, TLS, timeout, or an HTTP answer that is not the Hub's
            pass

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return answer[0]


@contextmanager
def _offline(enabled: bool):
    # `datasets` and `huggingface_hub` read HF_HUB_OFFLINE from the environment once, at import; both look the
    # module attributes up at call time, so setting them here switches offline mode for this call only.
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if enabled:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


# --- shared --------------------------------------------------------------------------------------------------------


def _select_text_column(splits, text_column: str, *, where: str):
    from datasets import Value

    for split in splits.values():
        if split.features is None:  # a stream that does not declare its columns: data/streaming.py checks the rows
            continue
        columns = list(split.column_names)
        if text_column not in columns:
            raise UserError(
                f"column {text_column!r} not found in {where}: set text_column to one of {', '.join(columns)}"
            )
        feature = split.features[text_column]
        if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
            raise UserError(f"column {text_column!r} of {where} does not hold text: pick a column of strings")
    splits = splits.select_columns([text_column])
    return splits.rename_column(text_column, "text") if text_column != "text" else splits


def _with_validation(splits, fraction: float, seed: int, more: str = _MORE_DOCUMENTS["paragraph"]):
    import datasets

    if "validation" in splits:
        return datasets.DatasetDict({"train": splits["train"], "validation": splits["validation"]})
    train = splits["train"]
    if train.num_rows < 2:
        raise UserError(
            f"only {train.num_rows} document found, too few to split off a validation set: {more} "
            "or provide a validation file"
        )
    try:
        parts = train.train_test_split(test_size=fraction, seed=seed)
    except ValueError as e:  # the fraction leaves one side empty
        raise UserError(
            f"cannot split {train.num_rows} documents with validation fraction {fraction}: use a fraction that leaves "
            "documents on both sides, or provide a validation file"
        ) from e
    return datasets.DatasetDict({"train": parts["train"], "validation": parts["test"]})


def _reason(e: BaseException) -> str:
    """The root cause of `e` in one short line: `datasets` wraps the useful error in vaguer ones."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


# --- all of it -----------------------------------------------------------------------------------------------------


def load_documents(
    source: str, *, path: str | None = None, text_column: str = "text", document: str = "paragraph"
) -> "Dataset":
    """Every document at `path` (source "files"), one column `text`, with no split: all files, validation*/test*
    names included, as `load_text_splits` reads them (`document`: what one is in .txt files). For scoring a text
    whole (`perceiver eval --path`), whatever its size or its files' names."""
    if source != "files":
        raise UserError(f"a path is for source 'files', not {source!r}: leave out the source or the path")
    if not path:
        raise UserError("source 'files' needs a path: set path to a text file, a directory or a glob")
    if document not in DOCUMENTS:
        raise UserError(f"unknown data.document {document!r}: use one of {', '.join(DOCUMENTS)}")
    return _load_files(path=path, text_column=text_column, document=document, by_name=False)["train"]
