"""Streaming: documents are read, tokenized and packed into chunks as training goes (`data.streaming = true`).

The map-style pipeline (pipeline.py) tokenizes and chunks a whole corpus before the first step and caches it on disk:
right for the embedded corpus and WikiText, hours and the corpus's size again in disk for a Wikipedia dump or a
directory of a few hundred GB. Streaming reads the same sources ("files" and "hub") through `datasets`' iterable
datasets instead, so training starts within seconds whatever the corpus size and nothing is written.

- Documents: the rows of the source in order, read by the same `datasets` builders as the map-style pipeline (a
  document is the same paragraph, line, file or row), less blank ones. A row whose text is not a string is skipped
  with a warning; so is the rest of a file that cannot be read mid-stream (the warning names it). Before training,
  the same problems, an empty corpus and a missing column are errors instead (`check_stream`).
- Validation: the source's validation split (validation*-named files, a hub dataset's "validation" split); else the
  first documents are set aside: `validation_fraction` of them, at most `validation_documents` (decided by reading at
  most validation_documents / validation_fraction documents when the data module is set up).
- Shards: each of the K = ranks x DataLoader workers readers takes every K-th document (reader k: documents k, k + K,
  ...). A reader reads the others' documents too but tokenizes only its own: reading text costs little beside
  tokenizing it, and every reader gets its share however few files there are. The ranks agree after every batch
  whether each still has one (one small all-reduce), so a pass ends on every rank together when the first reader runs
  dry, leaving out at most about a document batch per reader.
- Chunks: a reader tokenizes and chunks its documents CHUNK_BATCH_DOCS at a time with pipeline.py's functions, so
  chunk boundaries follow the map-style rule (one home for it: `pipeline.make_chunker`, `pipeline.chunk_texts`).
- Shuffling: a shuffle buffer of `shuffle_buffer` chunks, filled, permuted by a generator seeded with (seed, pass,
  reader, block) and emptied, block after block.
- Position: with every batch a reader reports where it is: the source's own position (`datasets`' state_dict) at the
  start of the document batch the current block began in, how many of that batch's chunks came before the block, the
  block's number and how many of its chunks were handed out. The loader keeps the position of the last batch training
  consumed (the data module's `on_before_batch_transfer` hands it over, so Lightning's prefetched batch does not
  count) and Lightning saves it in every checkpoint. Resuming re-reads one block of chunks and goes on with exactly
  the chunks, masks and windows a run that never stopped would have had: the collator is reseeded for each batch
  from (pass, batch number), not from how many batches this process built.
- A pass is one Lightning epoch. With `repeat` off (trainer.max_epochs unset) a second pass is an error: the stream ran
  dry before the run's end (`StreamExhausted`); `StreamCheckpoint` saves the last step first.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from perceiver_cli.data.collators import _mix
from perceiver_cli.data.pipeline import CHUNK_BATCH_DOCS, _Tokenize, chunk_texts, make_chunker
from perceiver_cli.errors import UserError

STATE_KEY = "stream_state"  # a training batch's position, taken out by TextDataModule.on_before_batch_transfer
_log = logging.getLogger(__name__)
# status of a batch, agreed by the ranks (the smallest wins)
_ERROR, _DRY, _BATCH = 0, 1, 2


class StreamError(UserError):
    """The stream cannot go on (data that cannot be read, no more data): the run ends with exit status 2, and
    `StreamCheckpoint` saves what was trained first."""


class StreamExhausted(StreamError):
    """The corpus ran out before the run's end and trainer.max_epochs does not ask for another pass."""


@dataclass(frozen=True)
class StreamSource:
    """One split of a corpus to stream: a `datasets.IterableDataset` with its text column, and names for messages."""

    dataset: Any  # datasets.IterableDataset; every reader iterates a copy of its own
    text_column: str
    what: str  # "'corpus/'" or "dataset 'wikitext'"
    files: tuple[str, ...] = ()  # shard i of a "files" source is files[i]

    def shard_name(self, index: int | None) -> str:
        if index is not None and index < len(self.files):
            return self.files[index]
        return f"{self.what}, shard {index}" if index is not None else self.what


def stream_splits(
    source: str,
    *,
    path: str | None = None,
    name: str | None = None,
    config: str | None = None,
    text_column: str = "text",
    document: str = "paragraph",
) -> tuple[StreamSource, StreamSource | None]:
    """The training split and the validation split (None: the source has none) of a "files" or "hub" source, as
    streams; nothing is read beyond what `datasets` needs to know the files and their columns."""
    import datasets

    from perceiver_cli.data.sources import DOCUMENTS, _load_hub, _reason, _resolve_files, _split_files, files_builder

    if document not in DOCUMENTS:
        raise UserError(f"unknown data.document {document!r}: use one of {', '.join(DOCUMENTS)}")
    if source == "files":
        if not path:
            raise UserError("source 'files' needs a path: set path to a text file, a directory or a glob")
        files = _resolve_files(path)
        builder, options = files_builder(files, path, document)
        column = "text" if builder == "text" else text_column

        def open_(part: list[str]) -> StreamSource:
            try:
                stream = datasets.load_dataset(
                    builder, data_files={"train": part}, split="train", streaming=True, **options
                )
            except Exception as e:
                raise UserError(
                    f"could not read {path!r} as {builder} files ({_reason(e)}): check the file format"
                ) from e
            return StreamSource(stream, column, repr(path), tuple(part))

        parts = _split_files(files)
        return open_(parts["train"]), (open_(parts["validation"]) if "validation" in parts else None)
    if source == "hub":
        if not name:
            raise UserError("source 'hub' needs a dataset name: set name (e.g. 'wikitext') and config if it has one")
        if document != "paragraph":
            raise UserError(
                "data.document applies to .txt files of source 'files', not to source 'hub': leave it unset"
            )
        splits = _load_hub(name, config, text_column, streaming=True)  # the text column is "text" now
        what = f"dataset {name!r}" + (f" ({config})" if config else "")
        validation = StreamSource(splits["validation"], "text", what) if "validation" in splits else None
        return StreamSource(splits["train"], "text", what), validation
    raise UserError(f"data.streaming applies to sources 'files' and 'hub', not {source!r}: leave it unset")


# --- documents -------------------------------------------------------------------------------------------------------


class _Documents:
    """The texts of a stream from a position (a `datasets` state_dict; None: the start), less blank ones and rows whose
    text is not a string. `strict`: every problem is a UserError (before training); otherwise a file that cannot be
    read is skipped from the point it fails, with a warning if `warn` (one reader warns: they all read everything)."""

    def __init__(self, source: StreamSource, position: dict | None, *, strict: bool = False, warn: bool = True):
        self.source = source
        self.dataset = copy.deepcopy(source.dataset)
        if position is not None:
            self.dataset.load_state_dict(copy.deepcopy(position))
        self.strict = strict
        self.warn = warn
        self.skipped = 0  # rows whose text is not a string

    def position(self) -> dict:
        """Where the next document comes from (after the last one handed out)."""
        return self.dataset.state_dict()

    def __iter__(self) -> Iterator[str]:
        from perceiver_cli.data.sources import _reason

        column = self.source.text_column
        while True:
            try:
                for row in self.dataset:
                    if column not in row:
                        raise UserError(
                            f"column {column!r} not found in {self.source.what}: set text_column to one of "
                            f"{', '.join(map(str, row))}"
                        )
                    text = row[column]
                    if not isinstance(text, str):
                        self._not_text(text)
                        continue
                    if text and not text.isspace():
                        yield text
                return
            except UserError:
                raise
            except Exception as e:  # a file that cannot be decoded or parsed: datasets/pyarrow raise many kinds
                state = self.dataset.state_dict()
                shard = _shard_index(state)
                where = self.source.shard_name(shard)
                if self.strict:
                    raise UserError(f"could not read {where} ({_reason(e)}): fix or remove the file") from e
                following = _next_shard(state)
                if following is None:
                    raise StreamError(f"could not read {where} ({_reason(e)}); training stopped") from e
                if self.warn:
                    _log.warning(f"warning: skipping the rest of {where}: {_reason(e)}")
                self.dataset.load_state_dict(following)

    def _not_text(self, value: Any) -> None:
        if self.strict and value is not None:
            raise UserError(f"column {self.source.text_column!r} of {self.source.what} does not hold text (found "
                            f"{type(value).__name__}): pick a column of strings")
        self.skipped += 1
        if self.warn and self.skipped == 1:
            _log.warning(f"warning: skipping documents of {self.source.what} whose {self.source.text_column!r} is not "
                         f"text (the first: {value!r})")


def _shard_index(state: Any) -> int | None:
    if isinstance(state, dict):
        if "shard_idx" in state:
            return int(state["shard_idx"])
        for value in state.values():
            if (found := _shard_index(value)) is not None:
                return found
    return None


def _next_shard(state: dict) -> dict | None:
    """`state` (a `datasets` state_dict) moved to the start of the next shard; None if it has no shard to move."""
    state = copy.deepcopy(state)

    def move(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        if "shard_idx" in node and "shard_example_idx" in node:
            node["shard_idx"] += 1
            node["shard_example_idx"] = 0
            return True
        if "previous_state" in node:  # a rebatching layer: forget the table it was in the middle of
            node.update(previous_state=None, batch_idx=0, num_chunks_since_previous_state=0, cropped_chunk_length=0)
        return any(move(value) for value in node.values())

    return state if move(state) else None


def check_stream(train: StreamSource, validation: StreamSource | None, fraction: float, most: int) -> int:
    """Read the start of the stream as training will (every problem a UserError, before anything is trained) and
    return how many of its first documents are set aside for validation: 0 with a validation split; otherwise
    `fraction` of them, at most `most` (read at most most / fraction documents to decide)."""
    limit = math.ceil(most / fraction) if validation is None else 1
    seen = sum(1 for _ in itertools.islice(_Documents(train, None, strict=True), limit))
    if seen == 0:
        raise UserError(f"no text found in {train.what}: every document is empty")
    if validation is not None:
        if not any(True for _ in itertools.islice(_Documents(validation, None, strict=True), 1)):
            raise UserError(f"no text found in the validation files of {validation.what}: every document is empty")
        return 0
    if seen >= limit:
        return most
    aside = max(1, round(fraction * seen))
    if seen - aside < 1:
        raise UserError(
            f"only {seen} document found in {train.what}, too few to set some aside for validation: add more text "
            "or provide a validation file"
        )
    return aside


# --- chunks and batches --------------------------------------------------------------------------------------------


class ChunkStream(IterableDataset):
    """Batches of one split of a stream (see the module docstring), each with the position after it.

    Iterated (in the main process or a DataLoader worker), it yields `(worker, batch, position)`, then `(worker, None,
    None)` when its reader runs dry, or `(worker, None, {"error": message})` when the stream cannot go on. `skip`: the
    first documents are someone else's (validation's); `take`: only the first documents are this split's.
    `reseed`: reseed the collator for every batch from (pass, batch number) (training)."""

    def __init__(
        self,
        source: StreamSource,
        tokenizer,
        *,
        task: str,
        max_seq_len: int,
        batch_size: int,
        collator: Callable,
        seed: int = 0,
        shuffle_buffer: int = 1,
        skip: int = 0,
        take: int | None = None,
        lookahead: bool = False,
        reseed: bool = False,
        documents_per_batch: int = CHUNK_BATCH_DOCS,
    ):
        self.source = source
        self._tokenize = _Tokenize(tokenizer)
        self._chunker = make_chunker(tokenizer, task, max_seq_len)
        self.batch_size = batch_size
        self.collator = collator
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.skip = skip
        self.take = take
        self.lookahead = lookahead
        self.reseed = reseed
        self.documents_per_batch = documents_per_batch
        self.rank, self.world = 0, 1
        self.pass_ = 0
        self.resume: dict[int, dict] | None = None  # worker -> position

    def start(self, pass_: int, rank: int = 0, world: int = 1, resume: dict[int, dict] | None = None) -> None:
        """What the next iteration reads: set before the DataLoader starts its workers (they copy the dataset)."""
        self.pass_, self.rank, self.world, self.resume = pass_, rank, world, resume

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, readers = self.rank * workers + worker, self.world * workers
        position = (self.resume or {}).get(worker)
        try:
            for batch, after in self.batches(reader, readers, position):
                yield worker, batch, after
        except StreamError as e:
            yield worker, None, {"error": e.message}
            return
        yield worker, None, None

    def batches(self, reader: int = 0, readers: int = 1, position: dict | None = None):
        """(batch, position after it) for reader `reader` of `readers`, from `position` (None: the pass's start)."""
        position = position or {}
        number = position.get("batch", 0)
        examples, after = [], None
        for example, after in self._shuffled(reader, readers, position.get("chunk")):
            examples.append(example)
            if len(examples) == self.batch_size:
                yield self._collate(examples, number), {"batch": number + 1, "chunk": after}
                number, examples = number + 1, []
        if examples:
            yield self._collate(examples, number), {"batch": number + 1, "chunk": after}

    def _collate(self, examples: list[dict], number: int) -> dict:
        if self.reseed:
            self.collator.set_epoch(_mix("stream", self.pass_, number))
        return self.collator(examples)

    def _shuffled(self, reader: int, readers: int, position: dict | None):
        """(example, position after it): this reader's chunks through the shuffle buffer."""
        position = position or {}
        block, handed_out, start = position.get("block", 0), position.get("emitted", 0), position.get("start")
        chunks = self._chunks(reader, readers, start)
        while True:
            items = list(itertools.islice(chunks, self.shuffle_buffer))
            if not items:
                return
            order = self._order(len(items), reader, block)
            for i in range(handed_out, len(items)):
                yield items[order[i]][0], {"block": block, "start": start, "emitted": i + 1}
            start, block, handed_out = items[-1][1], block + 1, 0

    def _order(self, n: int, reader: int, block: int) -> list[int]:
        if self.shuffle_buffer <= 1:
            return list(range(n))
        generator = torch.Generator().manual_seed(_mix(self.seed, self.pass_, reader, block))
        return torch.randperm(n, generator=generator).tolist()

    def _chunks(self, reader: int, readers: int, position: dict | None):
        """(example, position after it): this reader's chunks in corpus order, from `position`."""
        position = position or {"source": None, "documents": 0, "chunks": 0, "offset": 0}
        documents = _Documents(self.source, position["source"], warn=reader == 0)
        start, index = position["source"], position["documents"]  # where the current document batch began
        start_index, base, offset = index, position["chunks"], position["offset"]
        texts: list[str] = []

        def cut():
            chunks = chunk_texts(texts, self._tokenize, self._chunker)
            for i in range(offset, len(chunks)):
                ids = chunks[i]
                if self.lookahead and i + 1 < len(chunks):  # for CLMCollator(random_shift=True), as ChunkDataset
                    ids = np.concatenate([ids, chunks[i + 1]])
                after = {"source": start, "documents": start_index, "chunks": base, "offset": i + 1}
                yield {"input_ids": ids, "index": (base + i) * readers + reader}, after
            return len(chunks)

        for text in documents:
            index += 1
            number = index - 1  # of this document in the stream
            if self.take is not None and number >= self.take:
                break
            if number < self.skip or (number - self.skip) % readers != reader:
                continue
            texts.append(text)
            if len(texts) == self.documents_per_batch:
                base += yield from cut()
                texts, offset = [], 0
                start, start_index = documents.position(), index
        if texts:
            yield from cut()


class StreamLoader(DataLoader):
    """Batches of a `ChunkStream`, one pass per Lightning epoch, in the same order on every resume.

    Its DataLoader workers each read a shard (batch t of a rank comes from worker t mod workers, as the DataLoader
    deals them out anyway). `state_dict()` is the position of the last batch that training consumed (see `consume`);
    Lightning saves it in checkpoints and hands it to `load_state_dict()` on resume. `trainer`: the Trainer, for the
    pass number (its epoch), the step count and the ranks (None: a single process, passes counted here). `repeat`:
    whether a second pass may follow (else StreamExhausted). `track`: put positions in batches (training)."""

    def __init__(
        self,
        dataset: ChunkStream,
        *,
        num_workers: int = 0,
        seed: int = 0,
        track: bool = False,
        repeat: bool = True,
        trainer: Callable[[], Any] = lambda: None,
        device: torch.device | str = "cpu",
    ):
        super().__init__(
            dataset, batch_size=None, num_workers=num_workers, collate_fn=_as_is,
            generator=torch.Generator().manual_seed(seed), persistent_workers=False,
        )
        self.seed = seed
        self.track = track
        self.repeat = repeat
        self._trainer = trainer
        self._device = device
        self._passes = 0  # passes completed, without a trainer
        self._consumed: dict | None = None
        self._resume: dict | None = None

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    def _layout(self) -> list[int]:
        trainer = self._trainer()
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return [rank, world, self.workers]

    def __iter__(self):
        trainer = self._trainer()
        pass_ = trainer.current_epoch if trainer is not None else self._passes
        if pass_ > 0 and not self.repeat:
            raise _exhausted(trainer)
        rank, world, workers = self._layout()
        resume, self._resume = self._resume, None
        if resume is not None and resume["pass"] != pass_:
            resume = None  # the checkpoint's pass had ended
        self.dataset.start(pass_, rank, world, resume["workers"] if resume else None)
        self.generator.manual_seed(_mix(self.seed, pass_))  # the workers' seeds, alike in every run
        expected = resume["next"] if resume else 0
        held: dict[int, deque] = defaultdict(deque)
        batches = super().__iter__()
        while True:
            while not held[expected]:
                try:
                    worker, batch, after = next(batches)
                except StopIteration:  # not reached: every reader reports its end
                    worker, batch, after = expected, None, None
                held[worker].append((batch, after))
            batch, after = held[expected].popleft()
            status = _BATCH if batch is not None else (_ERROR if after else _DRY)
            agreed = self._agree(status, trainer)
            if agreed == _BATCH:
                following = (expected + 1) % workers
                if self.track:
                    batch[STATE_KEY] = {"pass": pass_, "worker": expected, "next": following, "position": after,
                                        "layout": [world, workers]}
                expected = following
                yield batch
            elif agreed == _ERROR:
                raise StreamError(after["error"] if status == _ERROR else "another rank's data could not be read: "
                                                                         "see its error")
            else:
                self._passes = pass_ + 1
                return

    def _agree(self, status: int, trainer) -> int:
        """The smallest status over the ranks: they all go on, end the pass or fail at the same batch."""
        if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
            return status
        value = torch.tensor([status], device=self._device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return int(value.item())

    def consume(self, tag: dict) -> None:
        """Training took the batch whose position is `tag` (see STATE_KEY)."""
        state = self._consumed
        if state is None or state["pass"] != tag["pass"]:
            state = {"pass": tag["pass"], "workers": {}, "layout": tag["layout"]}
        state["workers"][tag["worker"]] = tag["position"]
        state["next"] = tag["next"]
        self._consumed = state

    def state_dict(self) -> dict:
        return copy.deepcopy(self._consumed) if self._consumed is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        _, world, workers = self._layout()
        if list(state["layout"]) != [world, workers]:
            saved_world, saved_workers = state["layout"]
            raise UserError(
                f"the run streamed its data with {saved_world} process(es) x {saved_workers} reader(s) each, and "
                f"resuming has {world} x {workers}: resume with the devices and data.num_workers it had",
            )
        self._resume = copy.deepcopy(state)
        self._consumed = copy.deepcopy(state)


def _as_is(item):
    return item


def _exhausted(trainer) -> StreamExhausted:
    steps = trainer.global_step if trainer is not None else 0
    limit = trainer.max_steps if trainer is not None else -1
    goal = f"trainer.max_steps = {limit:,}" if limit and limit > 0 else "the run's end"
    return StreamExhausted(
        f"the streamed corpus ran out after {steps:,} steps, before {goal}; "
        + (f"step {steps:,} is saved in last.ckpt" if steps else "nothing was trained"),
        hint="set trainer.max_epochs to read it more than once (each pass reshuffles it), or lower "
             "trainer.max_steps; then continue with --resume auto",
    )


class StreamCheckpoint(pl.Callback):
    """A stream that ends the run (it ran dry, or cannot be read) loses nothing: the last step goes to `last`, as
    every rank stops at the same batch (`StreamLoader._agree`)."""

    def __init__(self, last: Path):
        self.last = last

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, StreamError) and trainer.global_step > 0:
            trainer.save_checkpoint(self.last, weights_only=False)
