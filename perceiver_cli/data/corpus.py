"""The embedded corpora: text of the Python standard library installed on this machine, with no download.

Every machine that runs this project has a Python standard library, so several MB of real text are available
without a download and without committing text to this repo. `data.name` chooses one of three corpora:
- "prose" (the default, also when `data.name` is unset): English prose, one document per
  - docstring of a stdlib module, class or function (read with `ast`; modules are never imported, because some,
    like `antigravity` and `this`, do things on import),
  - block of full-line `#` comments from the same files (developers' explanations, mostly plain English),
  - section of `pydoc_data.topics` (the language reference text behind `help("if")`).
  Documents shorter than `MIN_CHARS` or with too little prose in them are dropped, and duplicates are kept once.
- "modules": the same prose grouped into long documents: one per stdlib file (its kept docstrings and comment
  blocks in source order, joined with blank lines) and one per reference topic, whole (tables included). A few
  hundred bytes to tens of KB, about 1.5 KB in the median.
- "code": the stdlib's `.py` files whole, one document per file (files that are not UTF-8, over `MAX_FILE_BYTES`
  or under `MIN_CHARS` are left out).
Test directories are skipped (`SKIP_DIRS`; their text is mostly code, and repetitive).

Each document goes to "validation" or "train" by a hash of its text (about `VALIDATION_FRACTION` of them), so the
split is stable no matter the order or number of documents. Files are JSON Lines, one `{"text": ...}` object per
document: unlike blank-line separated text, this keeps document boundaries exact (docstrings contain blank lines).
Each corpus is cached under `cache_root()/corpus/stdlib[-<name>]-py<version>-<hash of recipe and stdlib file list>/`
(the prose corpus keeps its original key) and written atomically, so an interrupted build never leaves a
half-written corpus behind.
"""

import ast
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from perceiver_cli.data.cache import cache_root
from perceiver_cli.errors import UserError
from perceiver_cli.files import write_atomically

RECIPE_VERSION = 1  # bump whenever the recipe below changes what is extracted; it is part of the cache key
# Each corpus's own recipe version, part of its cache key ("modules" also depends on the prose recipe above).
CORPUS_RECIPE_VERSIONS = {"prose": RECIPE_VERSION, "modules": 1, "code": 1}
CORPORA = tuple(CORPUS_RECIPE_VERSIONS)  # the names `data.name` may take with source = "embedded"
DEFAULT_CORPUS = "prose"
MIN_CHARS = 100  # long enough to be a sentence or two; shorter docstrings are mostly "Return self."
MIN_PROSE_RATIO = 0.8  # share of letters and whitespace; comment blocks of commented-out code fall below it
MAX_FILE_BYTES = 1_000_000  # "code": larger files are generated tables, not code anyone writes
VALIDATION_FRACTION = 0.05
SPLITS = ("train", "validation")
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
MANIFEST = "manifest.json"
_DESCRIPTIONS = {
    "prose": "English prose of the Python {python} standard library (docstrings, comments, language reference)",
    "modules": "English prose of the Python {python} standard library, one document per module or reference topic",
    "code": "the Python {python} standard library's source, one document per .py file",
}


def corpus_name(name: str | None) -> str:
    """The embedded corpus `name` chooses (None: the default, "prose"); a UserError for an unknown one."""
    if name is None:
        return DEFAULT_CORPUS
    if name not in CORPORA:
        raise UserError(
            f"unknown embedded corpus {name!r}: set data.name to one of {', '.join(CORPORA)} (or leave it unset)"
        )
    return name


def embedded_corpus_files(name: str | None = None) -> dict[str, Path]:
    """Split name -> JSON Lines file of the embedded corpus `name` (see `CORPORA`; None: "prose"), building the
    corpus first if it is not cached."""
    name = corpus_name(name)
    directory = _corpus_dir(name)
    if not (directory / MANIFEST).is_file():
        _build(directory, name)
    return {split: directory / f"{split}.jsonl" for split in SPLITS}


def describe_embedded_corpus(name: str | None = None) -> str:
    """One line: what the embedded corpus `name` is, and its size per split."""
    name = corpus_name(name)
    directory = embedded_corpus_files(name)["train"].parent
    manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    parts = [
        f"{split} {info['bytes'] / 1e6:.2f} MB in {info['documents']:,} documents"
        for split, info in manifest["splits"].items()
    ]
    title = "embedded corpus" if name == DEFAULT_CORPUS else f"embedded corpus {name!r}"
    return f"{title}: {_DESCRIPTIONS[name].format(python=manifest['python'])}; {', '.join(parts)}"


def iter_documents(name: str | None = None) -> Iterator[str]:
    """All documents of the corpus `name` (None: "prose"), in a stable order: stdlib files sorted by path, then the
    reference topics."""
    name = corpus_name(name)
    if name == "modules":
        yield from _module_documents()
        return
    if name == "code":
        yield from _code_documents()
        return
    seen: set[str] = set()
    for path in _stdlib_files():
        for text in _file_documents(path):
            if text not in seen and _keep(text):
                seen.add(text)
                yield text
    for text in _reference_sections():
        if text not in seen and _keep(text):
            seen.add(text)
            yield text


def _module_documents() -> Iterator[str]:
    # The prose corpus's documents (each kept once, where it first appears), grouped by the file they come from.
    seen: set[str] = set()
    for path in _stdlib_files():
        kept = []
        for text in _file_documents(path):
            if text not in seen and _keep(text):
                seen.add(text)
                kept.append(text)
        if kept:
            yield "\n\n".join(kept)
    # Topics are kept whole even where their tables and heading rules bring the share of prose under
    # MIN_PROSE_RATIO: that filter is for comment blocks of commented-out code.
    for text in _reference_topics():
        if text not in seen and len(text) >= MIN_CHARS:
            seen.add(text)
            yield text


def _code_documents() -> Iterator[str]:
    seen: set[str] = set()
    for path in _stdlib_files():
        text = source_document(path)
        if text is not None and text not in seen:
            seen.add(text)
            yield text


def source_document(path: Path) -> str | None:
    """The "code" corpus's document for one source file: its text, whole and unchanged, or None if the file is left
    out (over `MAX_FILE_BYTES`, not valid UTF-8, or under `MIN_CHARS` of text)."""
    if path.stat().st_size > MAX_FILE_BYTES:
        return None
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if len(text.strip()) >= MIN_CHARS else None


def split_of(text: str) -> str:
    """"validation" for about VALIDATION_FRACTION of all texts, chosen by a stable hash (not Python's `hash`,
    which changes between processes)."""
    bucket = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") % 10_000
    return "validation" if bucket < VALIDATION_FRACTION * 10_000 else "train"


def _keep(text: str) -> bool:
    if len(text) < MIN_CHARS:
        return False
    prose = sum(c.isalpha() or c.isspace() for c in text)
    return prose / len(text) >= MIN_PROSE_RATIO


# --- where the text comes from ---------------------------------------------------------------------------------


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    files = []
    for directory, subdirs, names in os.walk(_stdlib_root()):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS)  # sorted in place: os.walk order is stable
        files += [Path(directory) / name for name in sorted(names) if name.endswith(".py")]
    return files


def _file_documents(path: Path) -> list[str]:
    """Docstrings and comment blocks of one source file, in source order."""
    source = path.read_bytes()
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a few stdlib files are deliberately not valid Python
        return []
    found: list[tuple[int, str]] = []
    inside_strings: set[int] = set()  # lines within multi-line string literals: a "#" there is not a comment
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)  # cleaned with inspect.cleandoc
            if doc:
                found.append((node.body[0].lineno, doc))
        elif isinstance(node, (ast.Constant, ast.JoinedStr)) and node.end_lineno != node.lineno:
            inside_strings.update(range(node.lineno + 1, node.end_lineno + 1))
    found += _comment_blocks(source, inside_strings)
    return [text for _, text in sorted(found, key=lambda item: item[0])]


_COMMENT = re.compile(r"^\s*#(?!!)(.*)$")  # a full-line comment, but not a "#!" shebang
_CODING = re.compile(r"coding[:=]")


def _comment_blocks(source: bytes, inside_strings: set[int]) -> list[tuple[int, str]]:
    """Runs of consecutive full-line comments, as (first line number, text without the "#")."""
    blocks: list[tuple[int, str]] = []
    start, lines = 0, []
    text = source.decode("utf-8", errors="replace")
    for number, line in enumerate(io.StringIO(text), start=1):
        match = None if number in inside_strings else _COMMENT.match(line)
        if match and not _CODING.search(line):
            start = start or number
            lines.append(match.group(1).strip(" #\t\r\n"))
        elif lines:
            blocks.append((start, "\n".join(lines).strip()))
            start, lines = 0, []
    if lines:
        blocks.append((start, "\n".join(lines).strip()))
    return blocks


_HEADING_RULE = re.compile(r"^([*=\-~^])\1+$")


def _reference_topics() -> list[str]:
    """The language reference topics of `pydoc`, whole, sorted by their key."""
    from pydoc_data.topics import topics  # plain data: a dict of strings

    return [topics[key].strip() for key in sorted(topics) if topics[key].strip()]


def _reference_sections() -> list[str]:
    """The language reference topics of `pydoc`, cut at their section headings (a title underlined by a line of
    "*", "=" or "-"), so that long topics become several documents and the split by hash stays balanced."""
    from pydoc_data.topics import topics  # plain data: a dict of strings

    sections = []
    for key in sorted(topics):
        lines = topics[key].splitlines()
        starts = [
            i for i in range(len(lines) - 1)
            if lines[i].strip() and _HEADING_RULE.match(lines[i + 1]) and len(lines[i + 1]) == len(lines[i])
        ]
        for begin, end in zip([0, *starts], [*starts, len(lines)]):
            section = "\n".join(lines[begin:end]).strip()
            if section:
                sections.append(section)
    return sections


# --- the cache -------------------------------------------------------------------------------------------------


def _corpus_dir(name: str = DEFAULT_CORPUS) -> Path:
    # The key changes with the recipe and with the stdlib's file list (a new Python, a patched stdlib); it is cheap
    # to compute (names and sizes, no reading), so finding the cached corpus costs a directory walk, not a build.
    # The prose corpus keeps the key it had before there were several corpora, so that existing caches stay valid.
    root = _stdlib_root()
    if name == DEFAULT_CORPUS:
        recipe = [RECIPE_VERSION, MIN_CHARS, MIN_PROSE_RATIO, VALIDATION_FRACTION, sorted(SKIP_DIRS)]
        prefix = "stdlib"
    else:
        recipe = [name, CORPUS_RECIPE_VERSIONS[name], RECIPE_VERSION, MIN_CHARS, MIN_PROSE_RATIO, MAX_FILE_BYTES,
                  VALIDATION_FRACTION, sorted(SKIP_DIRS)]  # fmt: skip
        prefix = f"stdlib-{name}"
    files = [(path.relative_to(root).as_posix(), path.stat().st_size) for path in _stdlib_files()]
    digest = hashlib.sha1(json.dumps([recipe, files]).encode("utf-8")).hexdigest()[:12]
    version = ".".join(map(str, sys.version_info[:3]))
    return cache_root() / "corpus" / f"{prefix}-py{version}-{digest}"


def _build(directory: Path, name: str = DEFAULT_CORPUS) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    documents: dict[str, list[str]] = {split: [] for split in SPLITS}
    for text in iter_documents(name):
        documents[split_of(text)].append(text)
    info = {}
    for split, texts in documents.items():
        body = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)
        write_atomically(directory / f"{split}.jsonl", body)
        info[split] = {
            "documents": len(texts),
            "bytes": sum(len(text.encode("utf-8")) for text in texts),
            "sha256": hashlib.sha256(body.encode("utf-8")).hexdigest(),
        }
    manifest = {
        "corpus": name,
        "recipe": CORPUS_RECIPE_VERSIONS[name],
        "python": ".".join(map(str, sys.version_info[:3])),
        "splits": info,
    }
    # The manifest goes last: its presence is what marks the corpus as complete.
    write_atomically(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")
