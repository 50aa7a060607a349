"""`data.tokenizer = "bpe:N"`: a byte-level BPE of N tokens, trained on the run's own training split as it starts.

A tokenizer fitted to the user's text is the largest single lever measured for small causal LMs on a CPU (about 2.5
bytes per token instead of 1, so the same window and step cover more text; benchmarks/README.md). The training
split is read exactly as the data module reads it (the same source, documents, fraction and seed), never the
validation split. The result is cached under `cache_root()/tokenizers/`, keyed by N and a hash of the training text,
so a second run on the same data reuses it; `perceiver train` then copies it into the run directory, which is what
the run's config and checkpoints point at (the cache can be cleared without breaking a model).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from perceiver_cli.data.cache import cache_root
from perceiver_cli.errors import UserError

BPE_PREFIX = "bpe:"
RECIPE_VERSION = 1  # part of the cache key: bump when train_bpe_on_split changes what it makes
BATCH_DOCS = 1000  # documents handed to the tokenizer trainer at a time


def bpe_vocab_size(spec: str) -> int | None:
    """N of a "bpe:N" spec, None for any other spec; a malformed one is an error."""
    if not spec.strip().lower().startswith(BPE_PREFIX):
        return None
    from perceiver_cli.data.tokenizer import min_bpe_vocab_size

    size = spec.strip()[len(BPE_PREFIX):]
    if not size.isdigit() or int(size) < min_bpe_vocab_size():
        raise UserError(
            f"tokenizer {spec!r}: use bpe:N with N at least {min_bpe_vocab_size()} (the 256 bytes and the special "
            "tokens), e.g. bpe:1024"
        )
    return int(size)


def text_batches(split, limit: int | None = None):
    """A split's non-blank texts, in lists of up to `BATCH_DOCS` (of its first `limit` documents)."""
    rows = split.num_rows if limit is None else min(limit, split.num_rows)
    for start in range(0, rows, BATCH_DOCS):
        texts = split[start : min(start + BATCH_DOCS, rows)]["text"]
        yield [text for text in texts if text and not text.isspace()]


def train_bpe_on_split(split, vocab_size: int, source: str):
    """A byte-level BPE (`train_bpe_tokenizer`) trained on the non-blank documents of `split`; `source` names the
    text in the error for an empty split."""
    from perceiver_cli.data.tokenizer import train_bpe_tokenizer

    documents = sum(len(texts) for texts in text_batches(split))
    if documents == 0:
        raise UserError(f"no text to train a tokenizer on: the training split of {source} has only empty documents")
    return train_bpe_tokenizer(text_batches(split), vocab_size, length=documents), documents


def run_tokenizer(spec: str, source_options: dict, streaming: bool = False) -> Path:
    """The directory of the "bpe:N" tokenizer for these data (`TextDataModule.source_options`), trained now unless
    the cache has it."""
    vocab_size = bpe_vocab_size(spec)
    if streaming:
        raise UserError(
            f"tokenizer {spec!r} is trained on the whole training split, which a streamed corpus does not have",
            hint="set data.tokenizer=utf8, or train one on a sample with `perceiver tokenizer train` (without "
            "data.streaming) and set data.tokenizer to its directory",
        )
    from perceiver_cli.data.sources import load_text_splits

    train = load_text_splits(**source_options)["train"]
    digest = hashlib.sha256(f"{RECIPE_VERSION} {vocab_size}".encode())
    for texts in text_batches(train):
        for text in texts:
            digest.update(text.encode("utf-8"))
            digest.update(b"\0")
    target = cache_root() / "tokenizers" / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}"
    if (target / "tokenizer.json").is_file():
        return target
    tokenizer, _ = train_bpe_on_split(train, vocab_size, source_options.get("path") or source_options["source"])
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tokenizer.save_pretrained(str(staging))
    try:
        os.rename(staging, target)  # whole or not at all
    except OSError:  # another process (a DDP rank) put the same tokenizer there first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def keep_in_run_dir(tokenizer_dir: Path, run_dir: Path) -> Path:
    """Copy a run-trained tokenizer into the run directory (what its config and checkpoints then name)."""
    kept = (run_dir / "tokenizer").resolve()
    if not kept.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=run_dir))
        shutil.copytree(tokenizer_dir, staging, dirs_exist_ok=True)
        os.rename(staging, kept)
    return kept
