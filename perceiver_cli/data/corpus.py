"""The embedded default corpus: English prose from the Python standard library installed on this machine.

Every machine that runs this project has a Python standard library, so a few MB of real natural-language text are
available without a download and without committing text to this repo. The documents are
- docstrings of stdlib modules, classes and functions (read with `ast`; modules are never imported, because some,
  like `antigravity` and `this`, do things on import),
- blocks of full-line `#` comments from the same files (developers' explanations, mostly plain English),
- the sections of `pydoc_data.topics` (the language reference text behind `help("if")`).
Test directories are skipped (their text is mostly code). Documents shorter than `MIN_CHARS` or with too little
prose in them are dropped, and duplicates are kept once.

Each document goes to "validation" or "train" by a hash of its text (about `VALIDATION_FRACTION` of them), so the
split is stable no matter the order or number of documents. Files are JSON Lines, one `{"text": ...}` object per
document: unlike blank-line separated text, this keeps document boundaries exact (docstrings contain blank lines).
The result is cached under `cache_root()/corpus/<python version>-<hash of recipe and stdlib file list>/` and
written atomically, so an interrupted build never leaves a half-written corpus behind.
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
from perceiver_cli.files import write_atomically

RECIPE_VERSION = 1  # bump whenever the recipe below changes what is extracted; it is part of the cache key
MIN_CHARS = 100  # long enough to be a sentence or two; shorter docstrings are mostly "Return self."
MIN_PROSE_RATIO = 0.8  # share of letters and whitespace; comment blocks of commented-out code fall below it
VALIDATION_FRACTION = 0.05
SPLITS = ("train", "validation")
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
MANIFEST = "manifest.json"


def embedded_corpus_files() -> dict[str, Path]:
    """Split name -> JSON Lines file of the embedded corpus, building the corpus first if it is not cached."""
    directory = _corpus_dir()
    if not (directory / MANIFEST).is_file():
        _build(directory)
    return {split: directory / f"{split}.jsonl" for split in SPLITS}


def describe_embedded_corpus() -> str:
    """One line: what the embedded corpus is, and its size per split."""
    embedded_corpus_files()
    manifest = json.loads((_corpus_dir() / MANIFEST).read_text(encoding="utf-8"))
    parts = [
        f"{split} {info['bytes'] / 1e6:.2f} MB in {info['documents']:,} documents"
        for split, info in manifest["splits"].items()
    ]
    return (
        f"embedded corpus: English prose of the Python {manifest['python']} standard library (docstrings, comments, "
        f"language reference); {', '.join(parts)}"
    )


def iter_documents() -> Iterator[str]:
    """All documents of the corpus, in a stable order: stdlib files sorted by path, then the reference topics."""
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


def _corpus_dir() -> Path:
    # The key changes with the recipe and with the stdlib's file list (a new Python, a patched stdlib); it is cheap
    # to compute (names and sizes, no reading), so finding the cached corpus costs a directory walk, not a build.
    root = _stdlib_root()
    recipe = [RECIPE_VERSION, MIN_CHARS, MIN_PROSE_RATIO, VALIDATION_FRACTION, sorted(SKIP_DIRS)]
    files = [(path.relative_to(root).as_posix(), path.stat().st_size) for path in _stdlib_files()]
    digest = hashlib.sha1(json.dumps([recipe, files]).encode("utf-8")).hexdigest()[:12]
    version = ".".join(map(str, sys.version_info[:3]))
    return cache_root() / "corpus" / f"stdlib-py{version}-{digest}"


def _build(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    documents: dict[str, list[str]] = {split: [] for split in SPLITS}
    for text in iter_documents():
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
    manifest = {"recipe": RECIPE_VERSION, "python": ".".join(map(str, sys.version_info[:3])), "splits": info}
    # The manifest goes last: its presence is what marks the corpus as complete.
    write_atomically(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")

