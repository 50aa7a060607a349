"""Collators: CLM shifting and left padding, random windows; MLM masking rates, 80/10/10, whole words, seeds."""

import numpy as np
import pytest
import torch

from perceiver_cli.data.collators import CLMCollator, MLMCollator
from perceiver_cli.data.datamodule import ChunkDataset
from perceiver_cli.data.masking import IGNORE_INDEX, WordUnits
from perceiver_cli.data.tokenizer import load_tokenizer
from perceiver_cli.errors import UserError

PAD, MASK, CLS, SEP = 0, 3, 4, 5
WHITESPACE_IDS = {b + 6 for b in b" \t\n\r\x0b\x0c"}
TEXT = (
    "Perceiver IO is a general architecture that handles data from arbitrary settings while scaling linearly "
    "with the size of inputs and outputs. Words like internationalization\tand\nnewlines separate tokens. "
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("utf8")


def _bytes(text):
    return [b + 6 for b in text.encode()]


def _mlm_examples(n, length=200):
    stream = _bytes(TEXT * (n * length // len(TEXT) + 2))
    return [{"input_ids": [CLS] + stream[i * length : (i + 1) * length] + [SEP], "index": i} for i in range(n)]


# --- CLM ---------------------------------------------------------------------------------------------------------


def test_clm_shift_and_left_padding():
    collate = CLMCollator(pad_token_id=PAD, max_seq_len=5)
    batch = collate([{"input_ids": [10, 11, 12, 13, 14, 15]}, {"input_ids": np.array([20, 21, 22], dtype=np.int32)}])
    assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == {
        "input_ids": (torch.long, (2, 5)),
        "labels": (torch.long, (2, 5)),
        "pad_mask": (torch.bool, (2, 5)),
    }
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14], [PAD, PAD, PAD, 20, 21]]
    assert batch["labels"].tolist() == [[11, 12, 13, 14, 15], [IGNORE_INDEX] * 3 + [21, 22]]
    assert batch["pad_mask"].tolist() == [[False] * 5, [True] * 3 + [False] * 2]


def test_clm_right_padding_and_longest_in_batch():
    batch = CLMCollator(PAD, max_seq_len=8, padding_side="right")([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    assert batch["input_ids"].tolist() == [[1, 2], [4, PAD]]  # padded to the longest example, not max_seq_len
    assert batch["labels"].tolist() == [[2, 3], [5, IGNORE_INDEX]]
    assert batch["pad_mask"].tolist() == [[False, False], [False, True]]
    with pytest.raises(UserError, match="padding side"):
        CLMCollator(PAD, 8, padding_side="up")


class _Chunks:
    """Stands in for a chunked `datasets.Dataset` (ChunkDataset only needs with_format, num_rows and rows)."""

    def __init__(self, rows):
        self.rows = rows
        self.num_rows = len(rows)

    def with_format(self, _):
        return self

    def __getitem__(self, i):
        return {"input_ids": np.array(self.rows[i], dtype=np.int32)}


def test_clm_random_shift_windows_vary_between_epochs_and_are_seeded():
    window = 9  # max_seq_len 8
    stream = list(range(100, 100 + 5 * window))
    dataset = ChunkDataset(_Chunks([stream[i : i + window] for i in range(0, len(stream), window)]), lookahead=True)
    assert len(dataset[0]["input_ids"]) == 2 * window and len(dataset[4]["input_ids"]) == window

    def epoch(collate):
        batch = collate([dataset[i] for i in range(len(dataset))])
        rows = torch.cat([batch["input_ids"][:, :1], batch["labels"]], dim=1).tolist()
        starts = []
        for i, row in enumerate(rows):
            start = stream.index(row[0])
            assert row == stream[start : start + window]  # a contiguous window of the token stream
            assert i * window <= start <= (i + 1) * window  # starting within chunk i (or exactly at chunk i + 1)
            starts.append(start - i * window)
        return starts

    collate = CLMCollator(PAD, max_seq_len=8, random_shift=True, seed=3)
    epochs = [epoch(collate) for _ in range(4)]
    assert len({tuple(e[:4]) for e in epochs}) > 1  # offsets change from epoch to epoch
    assert epochs[0][4] == 0  # the last chunk has nothing after it
    assert epochs == [epoch(c) for c in [CLMCollator(PAD, 8, random_shift=True, seed=3)] for _ in range(4)]
    assert epoch(CLMCollator(PAD, max_seq_len=8)) == [0] * 5  # without random shift: the chunks themselves


# --- MLM ---------------------------------------------------------------------------------------------------------


def test_clm_random_truncation_varies_the_length_and_keeps_the_start():
    collator = CLMCollator(pad_token_id=0, max_seq_len=64, random_truncation=True, min_seq_len=8, seed=1)
    chunk = np.arange(10, 75)  # 65 tokens: 64 inputs and their labels
    lengths = set()
    for _ in range(50):
        batch = collator([{"input_ids": chunk}, {"input_ids": chunk}])
        n = batch["input_ids"].shape[1]
        lengths.add(n)
        assert 8 <= n <= 64
        assert batch["input_ids"][0].tolist() == list(range(10, 10 + n))  # the start is kept
        assert batch["labels"][0].tolist() == list(range(11, 11 + n))
    assert len(lengths) > 20  # lengths spread over the range
    plain = CLMCollator(pad_token_id=0, max_seq_len=64)([{"input_ids": chunk}])
    assert plain["input_ids"].shape[1] == 64


def test_mlm_masking_rate_and_80_10_10(tokenizer):
    examples = _mlm_examples(64)
    batch = MLMCollator(tokenizer, whole_word_masking=False, seed=0)(examples)
    original = torch.tensor([e["input_ids"] for e in examples])
    selected = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][selected], original[selected])
    rate = selected.sum().item() / (original.numel() - 2 * len(examples))
    assert 0.13 < rate < 0.17
    masked = (batch["input_ids"] == MASK) & selected
    unchanged = (batch["input_ids"] == original) & selected
    replaced = selected & ~masked & ~unchanged
    n = selected.sum().item()
    assert 0.75 < masked.sum().item() / n < 0.85
    assert 0.06 < unchanged.sum().item() / n < 0.14
    assert 0.06 < replaced.sum().item() / n < 0.14
    assert batch["input_ids"][replaced].min() >= 6  # random replacements are regular tokens, never special
    assert torch.equal(batch["input_ids"][~selected], original[~selected])


def test_mlm_whole_word_masking_rate_and_words(tokenizer):
    examples = _mlm_examples(64)
    batch = MLMCollator(tokenizer, seed=1)(examples)
    selected = batch["labels"] != IGNORE_INDEX
    assert 0.12 < selected.sum().item() / (selected.numel() - 2 * len(examples)) < 0.18
    for row, example in zip(selected.tolist(), examples):
        ids = example["input_ids"]
        word = []
        for position, token in enumerate(ids + [SEP]):
            if token in WHITESPACE_IDS or token in (CLS, SEP):
                states = {row[p] for p in word}
                assert len(states) <= 1, "a word was partly masked"
                word = []
            else:
                word.append(position)


def test_mlm_never_selects_special_tokens_or_padding(tokenizer):
    examples = [{"input_ids": [CLS, *_bytes("short one"), SEP]}, {"input_ids": [CLS, *_bytes(TEXT), SEP]}]
    for seed in range(20):
        batch = MLMCollator(tokenizer, mask_prob=0.5, seed=seed)(examples)
        special = torch.isin(batch["input_ids"], torch.tensor([CLS, SEP])) | batch["pad_mask"]
        assert (batch["labels"][special] == IGNORE_INDEX).all()
        assert (batch["labels"][batch["pad_mask"]] == IGNORE_INDEX).all()
        assert (batch["input_ids"][batch["pad_mask"]] == PAD).all()
        assert batch["pad_mask"][0].tolist() == [False] * 11 + [True] * (len(examples[1]["input_ids"]) - 11)


def test_mlm_masks_at_least_one_token(tokenizer):
    for seed in range(30):
        batch = MLMCollator(tokenizer, mask_prob=0.01, seed=seed)([{"input_ids": [CLS, *_bytes("tiny"), SEP]}])
        assert (batch["labels"] != IGNORE_INDEX).sum() >= 1


def test_mlm_static_masking_repeats_and_dynamic_differs(tokenizer):
    examples = _mlm_examples(8)
    static = MLMCollator(tokenizer, static_masking=True, seed=5)
    first = static(examples)
    assert all(torch.equal(first[k], static(examples)[k]) for k in first)
    # the same example gets the same masks in any batch and any position
    alone = static([examples[3]])
    assert torch.equal(alone["labels"][0], first["labels"][3])
    assert not torch.equal(first["labels"], MLMCollator(tokenizer, static_masking=True, seed=6)(examples)["labels"])

    dynamic = MLMCollator(tokenizer, seed=5)
    one, two = dynamic(examples), dynamic(examples)
    assert not torch.equal(one["labels"], two["labels"])
    again = MLMCollator(tokenizer, seed=5)
    assert torch.equal(again(examples)["labels"], one["labels"])  # reproducible from the seed


def test_mlm_static_masking_needs_an_index(tokenizer):
    with pytest.raises(KeyError, match="index"):
        MLMCollator(tokenizer, static_masking=True)([{"input_ids": [CLS, 50, SEP]}])


def test_mlm_bad_options(tokenizer):
    with pytest.raises(UserError, match="mask probability"):
        MLMCollator(tokenizer, mask_prob=0)


# --- word boundaries of other tokenizers --------------------------------------------------------------------------


def _trained_tokenizer(kind):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["unbelievable transformations happen quickly", "the quick brown fox jumps over the lazy dog"] * 20
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if kind == "wordpiece":
        backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordPieceTrainer(vocab_size=100, special_tokens=specials)
    else:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=100, special_tokens=specials)
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )


@pytest.mark.parametrize("kind", ["wordpiece", "markers"])
def test_subword_tokenizers_mask_whole_words(kind):
    tokenizer = _trained_tokenizer(kind)
    words = tokenizer("unbelievable transformations happen quickly", add_special_tokens=False)["input_ids"]
    ids = [tokenizer.cls_token_id, *words, tokenizer.sep_token_id]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    units = WordUnits(tokenizer)
    assert units.convention == kind
    unit, count = units.unit_ids(torch.tensor(ids))
    assert count == 4  # four words, each of several subword tokens
    assert unit[0] == -1 and unit[-1] == -1  # [CLS] and [SEP]
    for u in range(count):
        word = "".join(t for t, x in zip(tokens, unit.tolist()) if x == u).replace("##", "").replace("▁", "")
        assert word in {"unbelievable", "transformations", "happen", "quickly"}
    for seed in range(10):
        labels = MLMCollator(tokenizer, mask_prob=0.3, seed=seed)([{"input_ids": ids}])["labels"][0]
        for u in range(count):
            states = {bool(labels[i] != IGNORE_INDEX) for i in (unit == u).nonzero().flatten().tolist()}
            assert len(states) == 1


def test_byte_words_are_runs_of_non_whitespace(tokenizer):
    units = WordUnits(tokenizer)
    assert units.convention == "characters"
    ids = torch.tensor([CLS, *_bytes("hi  thère\tok"), SEP, PAD])
    unit, count = units.unit_ids(ids)
    # "hi", " ", " ", "thère" (6 bytes: è is two, neither of them whitespace), "\t", "ok"
    assert unit.tolist() == [-1, 0, 0, 1, 2, 3, 3, 3, 3, 3, 3, 4, 5, 5, -1, -1]
    assert count == 6
    assert WordUnits(tokenizer, whole_words=False).unit_ids(ids)[1] == 13
