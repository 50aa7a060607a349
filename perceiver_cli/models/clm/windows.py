"""Perceiver AR's windows, in one place: which tokens a forward pass sees, and which of them it predicts from.

A pass reads a window of at most `max_seq_len` tokens. Its first tokens are the prefix, read by cross-attention
only; its last `num_latents` tokens (at most `max_latents`) are the latents, which attend to the whole window
(causally) and to each other, and only they give logits, each for the token after it:

    window:   p p p p p p L L L L      p: prefix (prefix_len = length - num_latents), L: latents
                          | | | |
    logits:               v v v v      the next token after each latent

Scoring a text (`scoring_windows`: `perceiver eval`, and the logits of every position that the Hugging Face
`forward` returns) cuts the positions into chunks of `stride` tokens (at most max_latents), and scores each chunk
("x") at the latents of its own window ("-": the rest of it), which reaches back `length` tokens: every position
is scored once, with between length - stride + 1 and length tokens of context once the text is that long. Length
8, stride 3, chunks cut from the start (the last may be short) or from the end (the first may be short):

    from the start                                         from the end
    0  1  2  3  4  5  6  7  8  9  10 11 12 13              0  1  2  3  4  5  6  7  8  9  10 11 12 13
    x  x  x                                                x  x
    -  -  -  x  x  x                                       -  -  x  x  x
       -  -  -  -  -  x  x  x                              -  -  -  -  -  x  x  x
                -  -  -  -  -  x  x  x                              -  -  -  -  -  x  x  x
                      -  -  -  -  -  -  x  x                                 -  -  -  -  -  x  x  x

Generating (`advance_window`) adds one token per step; the schedule says how the window moves. "chunked"
(`next_window`, the default): the new token is one more latent until the latents or the window are full; then
half of the latents (`latent_chunk`) join the prefix at once, and the oldest tokens leave when the prefix is full,
so a key/value cache is rebuilt once per max_latents / 2 tokens. "sliding" (the perceiver-io library's rule): the
window is always the last max_seq_len tokens, its latents the last max_latents; once full, every step rebuilds the
cache. Max_seq_len 10, max_latents 4, from a prompt of 3 tokens (one line per step, "." a token out of the window):

    chunked                              sliding
    L L L                                L L L
    L L L L                              L L L L
    p p p L L                            p L L L L
    p p p L L L                          p p L L L L
    p p p L L L L                        p p p L L L L
    p p p p p p L L                      p p p p L L L L
    p p p p p p L L L                    p p p p p L L L L
    p p p p p p L L L L                  p p p p p p L L L L
    . . . p p p p p p L L                . p p p p p p L L L L
    . . . p p p p p p L L L              . . p p p p p p L L L L

Shapes: W windows, n the longest window's length, ... any trailing dimensions (token ids, or embeddings C).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from perceiver_cli.models.clm.model import CausalLanguageModelConfig

# ---------------------------------------------------------------------------------------------------------------
# Generation windows: which tail of a growing sequence the model sees, and where its latents begin
# ---------------------------------------------------------------------------------------------------------------

SCHEDULES = ("chunked", "sliding")
DEFAULT_SCHEDULE = "chunked"


@dataclass(frozen=True)
class Window:
    """The last `length` tokens of a sequence, of which the last `num_latents` are latents."""

    length: int
    num_latents: int

    @property
    def prefix_len(self) -> int:
        return self.length - self.num_latents


def first_window(seq_len: int, config: CausalLanguageModelConfig, num_latents: int | None = None) -> Window:
    """The window of a prompt of `seq_len` tokens: at most max_seq_len tokens, with the requested latents (default:
    as many as fit), at most the window, and at least as many as the prefix cannot hold."""
    length = min(seq_len, config.max_seq_len)
    wanted = config.max_latents if num_latents is None else num_latents
    return Window(length, max(min(wanted, length), length - config.max_prefix_len))


def next_window(window: Window, config: CausalLanguageModelConfig) -> tuple[Window, bool]:
    """The window after one more token under the "chunked" schedule, and whether it is fresh: whether a key/value
    cache must be rebuilt by a full forward pass over it.

    While there is room, the new token is one more latent: a cache extends by one position and stays exact. When the
    latents or the window are full, half of the latents (`latent_chunk`) join the prefix at once and, if the prefix
    is then too long, its oldest tokens leave the window. Moving a block at a time, not a token, is what keeps the
    cache exact at a low cost: one full pass per `latent_chunk` tokens instead of one per token. (Moving one latent
    per token would leave every cached latent computed for an older prefix boundary, and sliding by one token would
    shift every absolute position in the cache.)
    """
    grown = Window(window.length + 1, window.num_latents + 1)
    if grown.num_latents <= config.max_latents and grown.length <= config.max_seq_len:
        return grown, False
    room = latent_chunk(config.max_latents)  # tokens that can be added before the next fresh window
    length = min(grown.length, config.max_seq_len - room)
    return Window(length, min(length, max(1, config.max_latents - room))), True


def advance_window(window: Window, config: CausalLanguageModelConfig, schedule: str) -> tuple[Window, bool]:
    """The window after one more token under `schedule`, and whether it is fresh (a cache must be rebuilt)."""
    if check_schedule(schedule) == "chunked":
        return next_window(window, config)
    new = Window(min(window.length + 1, config.max_seq_len), min(window.num_latents + 1, config.max_latents))
    return new, new != Window(window.length + 1, window.num_latents + 1)


def check_schedule(schedule: str, error: type[Exception] = ValueError) -> str:
    """`schedule` if it names a schedule, else raise `error` (the CLI passes its UserError) saying which do."""
    if schedule not in SCHEDULES:
        raise error(f"unknown schedule {schedule!r}: use {' or '.join(SCHEDULES)}")
    return schedule


def reusable_prefix(old: Window, new: Window) -> int:
    """How many positions of a cache built for window `old` stay exact in the fresh window `new` that follows it.

    When the window grew in place (latents joined the prefix, nothing left), the old prefix keeps its positions and
    its keys and values: a rebuild computes only the positions from there on, the latents and the tokens that just
    joined the prefix. When the window slid, every position moved and nothing is reusable.
    """
    return old.prefix_len if new.length == old.length + 1 else 0


def latent_chunk(max_latents: int) -> int:
    """Latents that join the prefix at once under the "chunked" schedule: half of them, at least one."""
    return max(1, max_latents // 2)


# ---------------------------------------------------------------------------------------------------------------
# Scoring windows: logits for every position of a text, each once
# ---------------------------------------------------------------------------------------------------------------


def scoring_windows(
    num_positions: int, length: int, stride: int, from_end: bool = False
) -> list[tuple[int, int, int]]:
    """Windows (lo, hi, k) that score each of `num_positions` positions once: the window is positions lo .. hi-1,
    at most `length` of them, and its last k positions (k <= stride) are scored, at its latents.

    The positions are cut into chunks of `stride`: from the start (the last chunk may be short: `perceiver eval`,
    whose positions are the inputs of a token stream, position i predicting token i + 1), or `from_end` (the first
    may be short: the last window is then the one a prompt of num_positions tokens starts generation with)."""
    if not 1 <= stride <= length:
        raise ValueError(f"the stride ({stride}) must be 1 to the window length ({length})")
    if from_end:
        ends = list(range(num_positions, 0, -stride))[::-1]
        starts = [max(0, hi - stride) for hi in ends]
    else:
        starts = list(range(0, num_positions, stride))
        ends = [min(lo + stride, num_positions) for lo in starts]
    return [(max(0, hi - length), hi, hi - start) for start, hi in zip(starts, ends)]


def left_pad(pieces: list[torch.Tensor], pad_value: float = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Windows of different lengths as one batch: `pieces` (n_i, ...) left-padded with `pad_value` to the longest,
    x (W, n, ...), and pad_mask (W, n), True at padding, or None when no window is padded. Left, so that the
    latents, the last positions of every window, line up."""
    width = max(piece.shape[0] for piece in pieces)
    first = pieces[0]
    x = first.new_full((len(pieces), width, *first.shape[1:]), pad_value)
    pad_mask = torch.ones(len(pieces), width, dtype=torch.bool, device=first.device)
    for row, piece in enumerate(pieces):
        x[row, width - piece.shape[0] :] = piece
        pad_mask[row, width - piece.shape[0] :] = False
    return x, pad_mask if pad_mask.any() else None


# ---------------------------------------------------------------------------------------------------------------
# Training windows: the window curriculum's short pieces
# ---------------------------------------------------------------------------------------------------------------


def short_pieces(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """A causal LM batch (input_ids, labels, pad_mask (B, n)) as pieces of `length` tokens, (B * n // length,
    length) each: the last n // length * length positions of every row, cut in order, so every piece is a stretch
    of the text with its own labels (a row's first n % length positions are dropped). Pieces that are all padding
    are left out. A batch no longer than `length` is returned as it is."""
    n = batch["input_ids"].shape[1]
    if n <= length:
        return batch
    keep = n // length * length

    def cut(t: torch.Tensor) -> torch.Tensor:  # (B, n) -> (B * n // length, length)
        return t[:, n - keep :].reshape(-1, length)

    pieces = {key: cut(batch[key]) for key in ("input_ids", "labels")}
    pad_mask = batch.get("pad_mask")
    if pad_mask is not None:
        pad_mask = cut(pad_mask)
        real = ~pad_mask.all(dim=1)
        pieces = {key: value[real] for key, value in pieces.items()}
        pieces["pad_mask"] = pad_mask[real]
    return pieces
