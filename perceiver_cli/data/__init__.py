"""Text data for Perceiver language models: tokenizer, corpora, tokenization pipeline, collators, datamodule.

Importing this package is cheap: the submodules import torch, datasets and transformers, so the names below are
re-exported lazily (on first attribute access) to keep `perceiver --help` fast.

Layers, bottom up:
- `tokenizer`: `load_tokenizer("utf8" | local dir)`, `vocab_size(tokenizer)`.
- `corpus`: the embedded default corpus, built from the Python standard library's own prose (no download).
- `sources`: `load_text_splits(...)` → a `DatasetDict` with "train"/"validation" splits of one `text` column.
- `pipeline`: `tokenize_and_chunk(...)` → cached chunks of token ids.
- `collators`: `CLMCollator`, `MLMCollator` → batches of `input_ids`, `labels`, `pad_mask` tensors.
- `datamodule`: `TextDataModule`, the Lightning entry point that ties them together.
"""

from importlib import import_module

_EXPORTS = {
    "load_tokenizer": "tokenizer",
    "vocab_size": "tokenizer",
    "embedded_corpus_files": "corpus",
    "describe_embedded_corpus": "corpus",
    "load_text_splits": "sources",
    "tokenize_and_chunk": "pipeline",
    "CLMCollator": "collators",
    "MLMCollator": "collators",
    "TextDataModule": "datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value
