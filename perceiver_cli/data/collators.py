"""Collators: lists of tokenized chunks -> batches of tensors for the models.

A batch is a dict of
- `input_ids`: LongTensor (B, n), padded to the longest example of the batch,
- `labels`: LongTensor (B, n), IGNORE_INDEX (-100) where there is no loss (padding, unmasked MLM tokens),
- `pad_mask`: BoolTensor (B, n), True at padding.
Examples are dicts with `input_ids` (a sequence of ints) and, where a collator needs one, a stable `index`.

Randomness (MLM masks, CLM window offsets and lengths) comes from generators seeded from `seed`, never from torch's
global generator, so batches depend on the seed alone. See `_Randomness` for how this works in worker processes and
on several ranks.
"""

import hashlib

import torch

from perceiver_cli.data.masking import IGNORE_INDEX, WordUnits, mask_example
from perceiver_cli.data.tokenizer import check_padding_side
from perceiver_cli.errors import UserError


class CLMCollator:
    """Causal LM batches: an example of up to max_seq_len + 1 tokens gives inputs tokens[:-1] and labels
    tokens[1:]. Short examples are padded on `padding_side` ("left" by default: Perceiver AR needs the latest tokens
    at the end). Longer examples (chunk i followed by chunk i + 1, see `ChunkDataset(lookahead=True)`) are cut to a
    window of max_seq_len + 1 tokens: at a random offset with `random_shift`, so that chunk boundaries differ
    between epochs, else at the start.

    `random_truncation` cuts each batch to a random length between `min_seq_len` and max_seq_len tokens (keeping
    the start). Perceiver AR's latents are the last positions of a sequence: trained on full-length sequences only,
    its latents never sit at early positions, and it writes poorly from a short prompt. The length is the same on
    every DDP rank at each step (its generator is not mixed with the rank): the ranks' batches are then the parts
    of one global batch of one length, as one process with the whole batch would train on, and every rank runs
    the same code path (a batch no longer than the latents has no prefix)."""

    def __init__(
        self,
        pad_token_id: int,
        max_seq_len: int,
        padding_side: str = "left",
        random_shift: bool = False,
        seed: int = 0,
        random_truncation: bool = False,
        min_seq_len: int = 16,
    ):
        check_padding_side(padding_side)
        self.pad_token_id = pad_token_id
        self.window = max_seq_len + 1
        self.padding_side = padding_side
        self.random_shift = random_shift
        self.random_truncation = random_truncation
        self.min_seq_len = min(min_seq_len, max_seq_len)
        self._randomness = _Randomness(seed)
        self._lengths = _Randomness(seed, per_rank=False)

    def set_epoch(self, epoch: int) -> None:
        self._randomness.set_epoch(epoch)
        self._lengths.set_epoch(epoch)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        windows = [self._window(torch.as_tensor(example["input_ids"], dtype=torch.long)) for example in examples]
        if self.random_truncation:
            n = int(torch.randint(self.min_seq_len, self.window, (1,), generator=self._lengths.generator()))
            windows = [w[: n + 1] for w in windows]  # n inputs and their n labels
        inputs = [w[:-1] for w in windows]
        labels = [w[1:] for w in windows]
        return _pad_batch(inputs, labels, self.pad_token_id, self.padding_side)

    def _window(self, ids: torch.Tensor) -> torch.Tensor:
        spare = len(ids) - self.window
        if spare <= 0:
            return ids
        start = 0
        if self.random_shift:
            start = int(torch.randint(spare + 1, (1,), generator=self._randomness.generator()))
        return ids[start : start + self.window]


class MLMCollator:
    """Masked LM batches, padded on the tokenizer's padding side ("right" unless chosen otherwise). See
    `perceiver_cli.data.masking` for which tokens are selected and what replaces them.

    Dynamic masking (default) draws fresh masks every time a batch is built. Static masking draws the masks of an
    example from `seed` and the example's `index`, so an example gets the same masks every epoch (used for
    validation, so that validation losses are comparable between evaluations)."""

    def __init__(
        self,
        tokenizer,
        mask_prob: float = 0.15,
        whole_word_masking: bool = True,
        static_masking: bool = False,
        seed: int = 0,
    ):
        if not 0 < mask_prob < 1:
            raise UserError(f"mask probability {mask_prob} is out of range: use a number between 0 and 1, e.g. 0.15")
        if tokenizer.mask_token_id is None:
            raise UserError("the tokenizer has no mask token, so it cannot train a masked LM: use 'utf8' or another")
        self.mask_token_id = tokenizer.mask_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.padding_side = tokenizer.padding_side
        self.mask_prob = mask_prob
        self.static_masking = static_masking
        self.seed = seed
        self.units = WordUnits(tokenizer, whole_words=whole_word_masking)
        self._randomness = _Randomness(seed)

    def set_epoch(self, epoch: int) -> None:
        self._randomness.set_epoch(epoch)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        inputs, labels = [], []
        for example in examples:
            ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
            masked, label = mask_example(ids, self.units, self.mask_token_id, self.mask_prob, self._generator(example))
            inputs.append(masked)
            labels.append(label)
        return _pad_batch(inputs, labels, self.pad_token_id, self.padding_side)

    def _generator(self, example: dict) -> torch.Generator:
        if not self.static_masking:
            return self._randomness.generator()
        if "index" not in example:
            raise KeyError("static masking needs a stable 'index' in every example (see ChunkDataset)")
        return torch.Generator().manual_seed(_mix(self.seed, int(example["index"])))


def _pad_batch(
    inputs: list[torch.Tensor], labels: list[torch.Tensor], pad_token_id: int, side: str
) -> dict[str, torch.Tensor]:
    n = max((len(x) for x in inputs), default=0)
    batch_inputs = torch.full((len(inputs), n), pad_token_id, dtype=torch.long)
    batch_labels = torch.full((len(inputs), n), IGNORE_INDEX, dtype=torch.long)
    pad_mask = torch.ones((len(inputs), n), dtype=torch.bool)
    for row, (x, y) in enumerate(zip(inputs, labels)):
        span = slice(n - len(x), n) if side == "left" else slice(0, len(x))
        batch_inputs[row, span] = x
        batch_labels[row, span] = y
        pad_mask[row, span] = False
    return {"input_ids": batch_inputs, "labels": batch_labels, "pad_mask": pad_mask}


class _Randomness:
    """A torch.Generator seeded from `seed` and the epoch on first use, mixed with the distributed rank (DDP ranks
    draw differently; `per_rank=False` for draws that every rank must make alike) and, in a DataLoader worker,
    with the worker's seed.

    The epoch (see `set_epoch`) makes each epoch's draws depend on the seed and the epoch alone, not on how many
    batches this process built before: a run resumed mid-training builds the same batches as one that never stopped.
    Why the worker seed: every worker gets a copy of the collator, and non-persistent workers get a fresh copy each
    epoch; seeded from `seed` alone, all workers would draw the same numbers, every epoch. The DataLoader derives
    worker seeds from its own (seeded) generator, different for each worker and each epoch, so masks and offsets
    differ between workers and epochs yet are reproducible."""

    def __init__(self, seed: int, per_rank: bool = True):
        self.seed = seed
        self.per_rank = per_rank
        self.epoch = 0
        self._generator: torch.Generator | None = None
        self._worker_seed: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._generator = None  # reseeded at the next draw

    def generator(self) -> torch.Generator:
        worker = torch.utils.data.get_worker_info()
        worker_seed = worker.seed if worker is not None else None
        if self._generator is None or worker_seed != self._worker_seed:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if distributed and self.per_rank else 0
            self._generator = torch.Generator().manual_seed(_mix(self.seed, rank, worker_seed, self.epoch))
            self._worker_seed = worker_seed
        return self._generator


def _mix(*values) -> int:
    """A 63-bit seed from several values, stable across processes and platforms."""
    return int.from_bytes(hashlib.sha256(repr(values).encode("utf-8")).digest()[:8], "little") >> 1
