"""Masked-language-model masking of one example: which tokens form a word, which words to mask, what to put there.

A "unit" is what gets selected as a whole: a word with whole-word masking, else a single token. Special tokens
([CLS], [SEP], [PAD], ...) belong to no unit and are never selected. How tokens group into words depends on the
tokenizer's vocabulary, detected from its tokens:
- character/byte level (every regular token is one character, as in the UTF-8 tokenizer): a word is a maximal run
  of non-whitespace tokens; each whitespace token (space, \\t, \\n, \\r, \\x0b, \\x0c) is a unit of its own, so that
  every regular token can be masked;
- WordPiece: a token starting with "##" continues the previous word;
- SentencePiece / byte-level BPE: a token starting with "▁" or "Ġ" starts a word, any other continues one;
- anything else: every token is its own unit.

Each unit is selected with probability `mask_prob`, so the expected share of selected tokens is `mask_prob`
whatever the word lengths; if none is selected, one unit is picked so that every example has a loss. Selected
tokens follow BERT's 80/10/10 rule: 80% become the mask token, 10% a random regular token, 10% stay unchanged.
"""

import torch

IGNORE_INDEX = -100  # label of positions without loss (torch.nn.functional.cross_entropy's default ignore_index)
_ASCII_WHITESPACE = frozenset(" \t\n\r\x0b\x0c")  # not str.isspace: bytes 0x85 and 0xa0 are UTF-8 continuations
_WORD_START_MARKERS = ("▁", "Ġ")


class WordUnits:
    """Per-vocabulary lookup tables that turn a sequence of token ids into unit ids."""

    def __init__(self, tokenizer, whole_words: bool = True):
        size = len(tokenizer)
        tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
        special_ids = {i for i in tokenizer.all_special_ids if i is not None and 0 <= i < size}
        self.special = torch.zeros(size, dtype=torch.bool)
        self.special[sorted(special_ids)] = True
        # A token continues the unit of the token before it if `continues[token]` and not `breaks_after[previous]`.
        self.continues = torch.zeros(size, dtype=torch.bool)
        self.breaks_after = torch.zeros(size, dtype=torch.bool)
        self.convention = _convention(tokens, special_ids) if whole_words else "tokens"
        for i, token in enumerate(tokens):
            if i in special_ids or not isinstance(token, str):
                continue
            if self.convention == "characters":
                space = token in _ASCII_WHITESPACE
                self.continues[i] = not space
                self.breaks_after[i] = space
            elif self.convention == "wordpiece":
                self.continues[i] = token.startswith("##")
            elif self.convention == "markers":
                self.continues[i] = not token.startswith(_WORD_START_MARKERS)
        self.regular_ids = (~self.special).nonzero().flatten()  # candidates for the 10% random replacement

    def unit_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(unit id per token, -1 for special tokens; number of units) for a 1-D tensor of token ids."""
        maskable = ~self.special[ids]
        previous_maskable = torch.cat([maskable.new_zeros(1), maskable])[:-1]
        previous_breaks = torch.cat([maskable.new_ones(1), self.breaks_after[ids]])[:-1]
        continues = self.continues[ids] & previous_maskable & ~previous_breaks
        starts = maskable & ~continues
        units = starts.cumsum(0) - 1
        units[~maskable] = -1
        return units, int(starts.sum())

    def spans(self, ids: torch.Tensor) -> list[tuple[int, int]]:
        """(first position, length) of each unit of a 1-D tensor of token ids, in order."""
        units, count = self.unit_ids(ids)
        first = (units >= 0) & (units != torch.cat([units.new_full((1,), -1), units[:-1]]))
        lengths = torch.bincount(units[units >= 0], minlength=count)
        return list(zip(first.nonzero()[:, 0].tolist(), lengths.tolist()))


def _convention(tokens: list, special_ids: set[int]) -> str:
    regular = [t for i, t in enumerate(tokens) if i not in special_ids and isinstance(t, str)]
    if regular and all(len(t) == 1 for t in regular):
        return "characters"
    if any(t.startswith("##") for t in regular):
        return "wordpiece"
    if any(t.startswith(_WORD_START_MARKERS) for t in regular):
        return "markers"
    return "tokens"


def mask_example(
    ids: torch.Tensor, units: WordUnits, mask_token_id: int, mask_prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input ids, labels) for a 1-D tensor of token ids. Labels hold the original id at selected positions
    and IGNORE_INDEX elsewhere. The draws depend only on `ids` and `generator`, not on the rest of the batch."""
    unit, num_units = units.unit_ids(ids)
    chosen = torch.rand(num_units, generator=generator) < mask_prob
    if num_units and not chosen.any():
        chosen[torch.randint(num_units, (1,), generator=generator)] = True
    selected = torch.zeros_like(ids, dtype=torch.bool)
    in_unit = unit >= 0
    selected[in_unit] = chosen[unit[in_unit]]

    draw = torch.rand(ids.shape, generator=generator)
    replacements = units.regular_ids[torch.randint(len(units.regular_ids), ids.shape, generator=generator)]
    inputs = ids.clone()
    to_mask = selected & (draw < 0.8)
    to_random = selected & (draw >= 0.8) & (draw < 0.9)
    inputs[to_mask] = mask_token_id
    inputs[to_random] = replacements[to_random]
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs, labels
