"""The seed's data modules (its `perceiver.data.text`), for its Lightning CLI scripts (examples/mlm.py and
examples/clm.py): `WikipediaDataModule`, `WikiTextDataModule` and, for local files, `TextFilesDataModule`.

They take the seed's arguments and run the pipeline `perceiver train` uses (`datamodule.TextDataModule`: cached
tokenization and chunking, the same collators), and expose the `vocab_size` and `max_seq_len` that the scripts link
to the model. The seed's arguments and what they are here:

- `tokenizer`: "utf8", a local Hugging Face tokenizer directory, or deepmind/language-perceiver or
  krasserm/perceiver-io-mlm, which name the same UTF-8 byte tokenizer (built here without a download);
- `task`: "mlm" (the seed's default) or "clm"; `max_seq_len`, `batch_size`, `num_workers`;
- `padding_side`: None pads as the task needs (left for clm, right for mlm);
- `mask_prob`, `mask_words` (whole-word masking), `static_masking`: masked LM only;
- `random_train_shift`, `random_train_truncation`, `random_min_seq_len`: causal LM only;
- `preproc_workers`: processes for tokenization.

The seed's arguments about its own preprocessing (`dataset_dir`, `add_special_tokens`, `add_eos_token`,
`pin_memory`, `valid_batch_size`, `random_valid_*`) have no counterpart: the pipeline caches under the perceiver
cache, ends every document with EOS and wraps masked LM chunks in [CLS] ... [SEP].

A hub dataset that cannot be reached fails within seconds, as in `perceiver train`. Importing this module makes an
uncaught `UserError` (a bad path, an unreachable dataset) end the script with its message instead of a traceback
(PERCEIVER_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Literal

from perceiver_cli.data.datamodule import TextDataModule
from perceiver_cli.errors import UserError

__all__ = ["TextFilesDataModule", "WikiTextDataModule", "WikipediaDataModule"]

# Hub tokenizer names of the seed that are the UTF-8 byte tokenizer ("utf8" here).
BYTE_TOKENIZER_NAMES = ("deepmind/language-perceiver", "krasserm/perceiver-io-mlm")


def tokenizer_spec(tokenizer: str) -> str:
    return "utf8" if tokenizer.strip() in BYTE_TOKENIZER_NAMES else tokenizer


class SeedTextDataModule(TextDataModule):
    """The seed's data module arguments over `TextDataModule`; subclasses say where the text comes from."""

    def __init__(
        self,
        tokenizer: str = "utf8",
        max_seq_len: int = 512,
        task: Literal["mlm", "clm"] = "mlm",
        mask_prob: float = 0.15,
        mask_words: bool = True,
        static_masking: bool = False,
        padding_side: Literal["left", "right"] | None = None,
        random_train_shift: bool = False,
        random_train_truncation: bool = False,
        random_min_seq_len: int = 16,
        preproc_workers: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """
        Args:
            tokenizer: "utf8" (or deepmind/language-perceiver, the same byte tokenizer) or a local tokenizer directory.
            max_seq_len: Tokens per training example (the model's max_seq_len).
            task: "mlm" (masked LM, examples/mlm.py) or "clm" (causal LM, examples/clm.py).
            mask_prob: Fraction of tokens masked (mlm).
            mask_words: Mask whole words rather than single tokens (mlm).
            static_masking: The same masks every epoch (mlm).
            padding_side: "left" (clm) or "right" (mlm); unset, the task's.
            random_train_shift: Vary chunk boundaries between epochs (clm).
            random_train_truncation: Train on random lengths down to random_min_seq_len (clm).
            random_min_seq_len: The shortest random truncation (clm).
            preproc_workers: Processes for tokenization (unset: one).
            batch_size: Examples per batch.
            num_workers: Data loading processes (0: in the training process).
            seed: Seed of the training order, the masks and the validation split.
        """
        super().__init__(
            task,
            **self.source(),
            tokenizer=tokenizer_spec(tokenizer),
            max_seq_len=max_seq_len,
            batch_size=batch_size,
            num_workers=num_workers,
            padding_side=padding_side,
            random_shift=random_train_shift,
            random_truncation=random_train_truncation,
            min_seq_len=random_min_seq_len,
            mask_prob=mask_prob,
            whole_word_masking=mask_words,
            static_masking=static_masking,
            seed=seed,
            num_proc=preproc_workers,
        )

    def source(self) -> dict[str, Any]:
        """The source arguments of `load_text_splits` (source, path, name, config, ...)."""
        raise NotImplementedError


class TextFilesDataModule(SeedTextDataModule):
    """Local text: a file, a directory or a glob of .txt, .jsonl/.json, .parquet or .csv files (see
    `perceiver_cli.data.sources`). Files named validation*/valid*/val*/dev* in a directory are the validation split;
    otherwise `validation_fraction` of the documents is."""

    def __init__(
        self,
        path: str,
        text_column: str = "text",
        document: Literal["paragraph", "line", "file"] = "paragraph",
        validation_fraction: float = 0.05,
        **kwargs: Any,
    ):
        """
        Args:
            path: A file, a directory or a glob of .txt, .jsonl/.json, .parquet or .csv files.
            text_column: The column of text in .jsonl/.json, .parquet and .csv files.
            document: What one document of a .txt file is: a "paragraph", a "line" or the whole "file".
            validation_fraction: Fraction of the documents split off for validation (without validation files).
        """
        self._source = dict(
            source="files", path=path, text_column=text_column, document=document,
            validation_fraction=validation_fraction,
        )
        super().__init__(**kwargs)

    def source(self) -> dict[str, Any]:
        return self._source


class _HubDataModule(SeedTextDataModule):
    """A dataset of the Hugging Face Hub, from the local cache when the Hub cannot be reached."""

    def _build(self):
        try:
            return super()._build()
        except UserError as err:
            local = "train on local files with --data=TextFilesDataModule"
            message = err.message.replace('use source = "files"', local)
            raise UserError(message, hint=err.hint) from err


class WikiTextDataModule(_HubDataModule):
    """WikiText (https://huggingface.co/datasets/wikitext): WikiText-103 (raw) by default, as in the seed."""

    def __init__(self, config: str = "wikitext-103-raw-v1", **kwargs: Any):
        """
        Args:
            config: The dataset's configuration: wikitext-103-raw-v1 or wikitext-2-raw-v1.
        """
        self._source = dict(source="hub", name="wikitext", config=config)
        super().__init__(**kwargs)

    def source(self) -> dict[str, Any]:
        return self._source


class WikipediaDataModule(_HubDataModule):
    """English Wikipedia (https://huggingface.co/datasets/wikimedia/wikipedia); `validation_fraction` of the
    articles (the seed's source_valid_size) is split off for validation."""

    def __init__(self, config: str = "20231101.en", validation_fraction: float = 0.02, **kwargs: Any):
        """
        Args:
            config: The dump: date and language, e.g. 20231101.en.
            validation_fraction: Fraction of the articles split off for validation.
        """
        self._source = dict(
            source="hub", name="wikimedia/wikipedia", config=config, validation_fraction=validation_fraction
        )
        super().__init__(**kwargs)

    def source(self) -> dict[str, Any]:
        return self._source


def _report_user_errors(previous=sys.excepthook):
    """An uncaught UserError ends a script as `perceiver` ends: `error: ...` (and `hint: ...`) on stderr."""

    def hook(kind, value, traceback):
        if isinstance(value, UserError) and os.environ.get("PERCEIVER_DEBUG", "") in ("", "0"):
            print(f"error: {value.message}", file=sys.stderr)
            if value.hint:
                print(f"hint: {value.hint}", file=sys.stderr)
        else:
            previous(kind, value, traceback)

    sys.excepthook = hook


if sys.excepthook is sys.__excepthook__:
    _report_user_errors()
