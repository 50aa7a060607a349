"""The Lightning entry point for training data: source -> tokenizer -> cached chunks -> dataloaders.

`prepare_data()` builds the caches (embedded corpus, arrow tables, tokenized chunks) once per node; `setup()` loads
them on every process (a cache hit: milliseconds). Dataloaders are deterministic for a fixed `seed`: the training
order comes from a seeded sampler, and masks and window offsets from the collators' seeded generators.

Training data is sharded across ranks by a DistributedSampler of our own (Lightning leaves it in place), also on one
process: every rank shuffles with the same seed and rank r of W takes every W-th example, so W ranks with batch B see
exactly the batches one process with batch W x B sees, epoch after epoch. When W does not divide the number of
examples, the sampler repeats the first examples of the epoch's order to even the ranks out (at most W - 1 per
epoch): no example is dropped and every rank runs the same number of steps. Validation gets Lightning's
DistributedSampler, which does the same without shuffling.

With `streaming`, nothing is prepared: documents are read, tokenized and chunked as training goes (data/streaming.py),
each rank reading its own shard, and the training loader's position is saved in checkpoints for `--resume`.
"""

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from perceiver_cli.data.collators import CLMCollator, MLMCollator
from perceiver_cli.data.pipeline import TASKS, count_tokens, tokenize_and_chunk
from perceiver_cli.data.sources import load_text_splits
from perceiver_cli.data.streaming import STATE_KEY, ChunkStream, StreamLoader, check_stream, stream_splits
from perceiver_cli.data.tokenizer import load_tokenizer, vocab_size
from perceiver_cli.errors import UserError


class ChunkDataset(Dataset):
    """The chunks of one split as examples `{"input_ids": int32 array, "index": i}`. With `lookahead`, chunk i is
    followed by chunk i + 1, so that `CLMCollator(random_shift=True)` can cut a window anywhere in between."""

    def __init__(self, chunks, lookahead: bool = False):
        self.chunks = chunks.with_format("numpy")
        self.lookahead = lookahead

    def __len__(self) -> int:
        return self.chunks.num_rows

    def __getitem__(self, index: int) -> dict:
        ids = self.chunks[index]["input_ids"]
        if self.lookahead and index + 1 < len(self):
            ids = np.concatenate([ids, self.chunks[index + 1]["input_ids"]])
        return {"input_ids": ids, "index": index}


class ResumableLoader(DataLoader):
    """A DataLoader that knows how far into an epoch it got. Lightning saves `state_dict()` in every checkpoint and
    hands it back on resume; the loader then starts the epoch where the checkpoint left it, with the batches an
    uninterrupted run would build next (same order, same masks: see `_Randomness.set_epoch`) instead of starting
    the epoch over. Exact with `num_workers = 0`; with workers, masks and offsets come from per-worker seeds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._served = 0  # batches handed out in the current epoch
        self._skip = 0  # batches to pass over at the start of the next epoch, from a checkpoint

    def __iter__(self):
        epoch = getattr(self.sampler, "epoch", 0)  # Lightning sets it before each epoch
        if hasattr(self.collate_fn, "set_epoch"):
            self.collate_fn.set_epoch(epoch)
        skip, self._skip, self._served = self._skip, 0, 0
        for index, batch in enumerate(super().__iter__()):
            # Skipped batches are still built, so that the collator's draws advance exactly as they did before.
            if index >= skip:
                self._served = index + 1
                yield batch

    def state_dict(self) -> dict:
        return {"batches": self._served}

    def load_state_dict(self, state: dict) -> None:
        self._skip = int(state.get("batches", 0))


class TextDataModule(pl.LightningDataModule):
    """Training and validation batches for a causal ("clm") or masked ("mlm") language model.

    Source arguments (`source`, `path`, `name`, `config`, `text_column`, `document`, `validation_fraction`) are
    those of `load_text_splits`; `tokenizer` is a spec for `load_tokenizer`. `padding_side` defaults to "left" for CLM
    (Perceiver AR) and "right" for MLM. `random_shift` (CLM training only) varies chunk boundaries between
    epochs, and `random_truncation` the sequence lengths (see `CLMCollator`). MLM options are those of `MLMCollator`; validation batches always use static masking so that validation
    losses are comparable between evaluations. `num_workers` defaults to 0: on small machines worker processes
    cost more than they save.

    `streaming` (sources "files" and "hub") streams the corpus instead of preparing it (data/streaming.py), through a
    shuffle buffer of `shuffle_buffer` chunks; without a validation split the first documents are set aside
    (`validation_fraction` of them, at most `validation_documents`). `repeat`: the stream may be read more than once
    (one pass per epoch; else running dry ends the run with an error).
    """

    def __init__(
        self,
        task: str,
        *,
        source: str = "embedded",
        path: str | None = None,
        name: str | None = None,
        config: str | None = None,
        text_column: str = "text",
        document: str = "paragraph",
        tokenizer: str = "utf8",
        max_seq_len: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        padding_side: str | None = None,
        random_shift: bool = False,
        random_truncation: bool = False,
        min_seq_len: int = 16,
        mask_prob: float = 0.15,
        whole_word_masking: bool = True,
        static_masking: bool = False,
        validation_fraction: float = 0.05,
        seed: int = 0,
        num_proc: int | None = None,
        streaming: bool = False,
        shuffle_buffer: int = 10_000,
        validation_documents: int = 1_000,
        repeat: bool = True,
    ):
        super().__init__()
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}: use 'clm' or 'mlm'")
        if batch_size < 1:
            raise UserError(f"batch size {batch_size} is too small: use 1 or more")
        if num_workers < 0:
            raise UserError(f"num_workers {num_workers} is negative: use 0 (no worker processes) or more")
        if (random_shift or random_truncation) and task != "clm":
            raise UserError("random_shift and random_truncation apply to causal LM (clm) data only: turn them off")
        self.task = task
        self.source_options = dict(
            source=source, path=path, name=name, config=config, text_column=text_column, document=document,
            validation_fraction=validation_fraction, seed=seed,
        )
        self.tokenizer_spec = tokenizer
        # Loaded now (it is quick) so that a bad spec fails at once and the model can be sized before setup().
        self._tokenizer = load_tokenizer(tokenizer, padding_side or ("left" if task == "clm" else "right"))
        self._max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.random_shift = random_shift
        self.truncation = dict(random_truncation=random_truncation, min_seq_len=min_seq_len)
        self.mask_options = dict(mask_prob=mask_prob, whole_word_masking=whole_word_masking)
        self.static_masking = static_masking
        self.seed = seed
        self.num_proc = num_proc
        self._chunks = None
        self.streaming = streaming
        self.stream_options = dict(shuffle_buffer=shuffle_buffer, validation_documents=validation_documents,
                                   repeat=repeat)
        self._stream = None  # (training split, validation split or None, documents set aside for validation)
        self._train_loader: StreamLoader | None = None
        # Fail on bad masking options now rather than at the first batch.
        if task == "mlm":
            MLMCollator(self._tokenizer, **self.mask_options)

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return vocab_size(self._tokenizer)

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    @property
    def pad_token_id(self) -> int:
        # Tokenizers without a pad token (GPT-2 style) pad with EOS: padded positions are masked out anyway.
        tokenizer = self._tokenizer
        for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
            if token_id is not None:
                return token_id
        return 0

    @property
    def chunks(self):
        """The tokenized, chunked splits (a DatasetDict with `input_ids`); builds them if needed."""
        if self._chunks is None:
            self._chunks = self._build()
        return self._chunks

    def prepare_data(self) -> None:
        # Runs on one process per node: downloads, the embedded corpus and tokenization all land in caches, which
        # setup() finds on every process. Keeping the result here only saves this process a cache lookup.
        if self.streaming:
            if self._stream is None:  # Lightning calls it again inside fit
                self._stream = self._open_stream()  # checks the start of the stream; prepares nothing
            return
        self._chunks = self._build()

    def setup(self, stage: str | None = None) -> None:
        if self.streaming:
            if self._stream is None:
                self._stream = self._open_stream()
            return
        self.chunks  # noqa: B018 (loads the caches that prepare_data built)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # A streamed training batch carries its position in the stream: training consumed it now (Lightning fetches
        # a batch ahead, so the loader's own count would be one too far).
        if isinstance(batch, dict) and STATE_KEY in batch:
            tag = batch.pop(STATE_KEY)
            if self._train_loader is not None:
                self._train_loader.consume(tag)
        return batch

    def train_dataloader(self) -> DataLoader:
        if self.streaming:
            self._train_loader = self._stream_loader(train=True)
            return self._train_loader
        lookahead = self.task == "clm" and self.random_shift
        dataset = ChunkDataset(self.chunks["train"], lookahead)
        # Lightning reshuffles each epoch through set_epoch (the order is seed + epoch's permutation).
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return self._loader(dataset, self._collator(train=True), sampler=sampler, resumable=True)

    def val_dataloader(self) -> DataLoader:
        if self.streaming:
            return self._stream_loader(train=False)
        return self._loader(ChunkDataset(self.chunks["validation"]), self._collator(train=False))

    def run_data(self) -> dict:
        """These data as the [data] section of a run config: what a checkpoint records of its training data (and
        `perceiver eval` reads back) when no run config records it (a Lightning CLI run)."""
        o = self.source_options
        return {
            "source": o["source"], "path": o["path"], "name": o["name"], "config_name": o["config"],
            "text_column": o["text_column"], "document": o["document"], "tokenizer": self.tokenizer_spec,
            "max_seq_len": self._max_seq_len, "batch_size": self.batch_size,
            "padding_side": self._tokenizer.padding_side, "random_shift": self.random_shift,
            "random_truncation": self.truncation["random_truncation"], "min_seq_len": self.truncation["min_seq_len"],
            "mask_prob": self.mask_options["mask_prob"], "whole_word_masking": self.mask_options["whole_word_masking"],
            "static_masking": self.static_masking, "validation_fraction": o["validation_fraction"],
        }

    def describe(self) -> dict:
        """Per split: number of chunks and of tokens, e.g. {"train": {"chunks": 4597, "tokens": 2357921}, ...}.
        Streaming: where validation comes from, {"validation_documents": N} (the first N documents) or {} (a split)."""
        if self.streaming:
            if self._stream is None:
                self._stream = self._open_stream()
            return {"validation_documents": self._stream[2]} if self._stream[1] is None else {}
        return {
            split: {"chunks": chunks.num_rows, "tokens": count_tokens(chunks)} for split, chunks in self.chunks.items()
        }

    def _open_stream(self):
        o = self.source_options
        train, validation = stream_splits(
            o["source"], path=o["path"], name=o["name"], config=o["config"], text_column=o["text_column"],
            document=o["document"],
        )
        aside = check_stream(train, validation, o["validation_fraction"], self.stream_options["validation_documents"])
        return train, validation, aside

    def _stream_loader(self, train: bool) -> StreamLoader:
        if self._stream is None:
            self._stream = self._open_stream()
        source, validation, aside = self._stream
        if not train and validation is not None:
            source, aside = validation, 0
        dataset = ChunkStream(
            source, self._tokenizer, task=self.task, max_seq_len=self._max_seq_len, batch_size=self.batch_size,
            collator=self._collator(train), seed=self.seed,
            shuffle_buffer=self.stream_options["shuffle_buffer"] if train else 1,
            skip=aside if train else 0, take=None if train or validation is not None else aside,
            lookahead=train and self.task == "clm" and self.random_shift, reseed=train,
        )
        trainer = self.trainer
        return StreamLoader(
            dataset, num_workers=self.num_workers, seed=self.seed, track=train,
            repeat=self.stream_options["repeat"] or not train, trainer=lambda: self.trainer,
            device=trainer.strategy.root_device if trainer is not None else "cpu",
        )

    def _build(self):
        splits = load_text_splits(**self.source_options)
        return tokenize_and_chunk(
            splits, self._tokenizer, task=self.task, max_seq_len=self._max_seq_len, num_proc=self.num_proc
        )

    def _collator(self, train: bool):
        if self.task == "clm":
            return CLMCollator(
                self.pad_token_id,
                self._max_seq_len,
                padding_side=self._tokenizer.padding_side,
                random_shift=self.random_shift and train,
                seed=self.seed,
                **(self.truncation if train else {}),
            )
        static = self.static_masking or not train
        return MLMCollator(self._tokenizer, **self.mask_options, static_masking=static, seed=self.seed)

    def _loader(
        self, dataset: Dataset, collator, sampler: DistributedSampler | None = None, resumable: bool = False
    ) -> DataLoader:
        return (ResumableLoader if resumable else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            generator=torch.Generator().manual_seed(self.seed),  # seeds the workers (see collators._Randomness)
            collate_fn=collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
