"""Perceiver AR inference over sequences of any length: logits for every position, and the one generation stepper.

Perceiver AR predicts from its latents only: a forward pass gives the logits of the last `num_latents` positions of a
window of at most `max_seq_len` tokens. Two things build on that, each in one place:

- `sequence_logits`: one row of logits per input position, as a Hugging Face causal LM returns them. The positions
  are cut, from the end, into chunks of `max_latents`; each chunk is scored at the latents of its own window, which
  reaches back `max_seq_len` tokens (`windows.scoring_windows`, the strided sliding window of `perceiver eval`).
  The last chunk's window is the window generation starts from, so the last row is the next-token logits
  `generate` uses. Cost: ceil(N / max_latents) windows instead of one, batched.
- `WindowStepper`: feeds a batch of growing sequences to the model token by token, following a window schedule
  (`windows.SCHEDULES`), with or without the key/value cache. `perceiver generate`, the Hugging Face wrapper's
  `generate()` and `perceiver serve` (whose requests join a running batch with `add` and leave it with `select`)
  all run it. Left padding never enters the model: rows are grouped by their number of real tokens, and each group
  runs unpadded with its own window, so a padded row generates what it generates alone.

The windows themselves (which tokens a pass sees, which are latents, how they move) are `windows`'s.

Shapes: B sequences, N positions, V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from perceiver_cli.models.clm.model import CausalLanguageModel
from perceiver_cli.models.clm.windows import (
    DEFAULT_SCHEDULE,
    Window,
    advance_window,
    check_schedule,
    first_window,
    left_pad,
    reusable_prefix,
    scoring_windows,
)

# ---------------------------------------------------------------------------------------------------------------
# Logits of every position
# ---------------------------------------------------------------------------------------------------------------


def left_padding(attention_mask: torch.Tensor | None, n: int) -> list[int]:
    """Padding tokens at the start of each row of a left-padded batch (1 = token, 0 = padding)."""
    if attention_mask is None:
        return []
    real = attention_mask.bool()
    num_pad = (~real).sum(dim=1)
    expected = torch.arange(n, device=real.device)[None] >= num_pad[:, None]
    if not torch.equal(real, expected):
        raise ValueError("attention_mask must describe left padding (0s, then 1s): pad decoder-only inputs on the left")
    return num_pad.tolist()


def sequence_logits(
    model: CausalLanguageModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    logits_to_keep: int = 0,
) -> torch.Tensor:
    """Logits (B, N, V) of every position of `input_ids` (B, N), or of the last `logits_to_keep` (> 0) only;
    padding positions get zeros. Each position is scored at a latent of its window (see `scoring_windows`), the
    windows of all rows and chunks batched B at a time, left-padded to one length (as `perceiver eval` does)."""
    return sequence_outputs(model, input_ids, attention_mask, logits_to_keep)[0]


def sequence_outputs(
    model: CausalLanguageModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    logits_to_keep: int = 0,
    run: Callable[..., tuple[torch.Tensor, ...]] | None = None,
) -> list[torch.Tensor]:
    """`sequence_logits` for any outputs per latent: `run(x, prefix_len, pad_mask)` returns tensors (W, L, ...) for
    the latents of W windows (default: the logits). `input_ids` may be token embeddings (B, N, C)."""
    if run is None:
        run = lambda x, prefix_len, pad_mask: (model(x, prefix_len, pad_mask=pad_mask),)  # noqa: E731
    b, n = input_ids.shape[:2]
    pads = left_padding(attention_mask, n) or [0] * b
    first_kept = max(0, n - logits_to_keep) if logits_to_keep > 0 else 0
    if n <= model.max_latents and not any(pads):  # one window, all latents: a single pass
        return [output[:, first_kept:] if first_kept else output for output in run(input_ids, 0, None)]
    jobs = [  # (row, lo, hi, k) in the columns of input_ids
        (row, pad + lo, pad + hi, k)
        for row, pad in enumerate(pads)
        for lo, hi, k in scoring_windows(n - pad, model.max_seq_len, model.max_latents, from_end=True)
        if pad + hi > first_kept
    ]
    out = None
    for start in range(0, len(jobs), b):
        batch = jobs[start : start + b]
        x, pad_mask = left_pad([input_ids[row, lo:hi] for row, lo, hi, _ in batch])
        outputs = run(x, max(0, x.shape[1] - model.max_latents), pad_mask)
        if out is None:
            out = [output.new_zeros(b, n - first_kept, *output.shape[2:]) for output in outputs]
        for i, (row, _, hi, k) in enumerate(batch):
            lo_kept = max(hi - k, first_kept)
            for placed, output in zip(out, outputs):
                placed[row, lo_kept - first_kept : hi - first_kept] = output[i, output.shape[1] - (hi - lo_kept) :]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The generation stepper
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Group:
    """Rows of the batch with the same number of real tokens: they share a window and run unpadded together."""

    rows: torch.Tensor  # (g,) their indices in the batch
    tokens: torch.Tensor  # (g, T) every real token so far; the window is the last window.length
    window: Window
    cache: object | None  # PerceiverARCache
    history: list[tuple[Window, bool]]  # (window, fresh) before each step, for crop()
    stale: bool = False  # the cache no longer matches the window (after crop): the next step rebuilds it


class WindowStepper:
    """Feeds a batch of growing sequences to a `CausalLanguageModel` token by token and returns next-token logits.

    `start(input_ids, attention_mask)` runs the prompts (left-padded; a prompt longer than max_seq_len keeps its last
    max_seq_len tokens), `step(tokens)` appends one token per row. Each row's window follows `schedule` over its own
    tokens, padding excluded. With `use_cache`, a step that keeps the window's latents growing costs one latent
    (`CausalLanguageModel.step`); a fresh window is rebuilt by one pass over what the cache cannot keep (see
    `reusable_prefix`). Without it, every step is a full pass over the same windows, so both give the same logits.

    Gradient mode is the caller's: `perceiver generate` runs under inference mode, transformers' `generate()` under
    no_grad.
    """

    def __init__(self, model: CausalLanguageModel, schedule: str = DEFAULT_SCHEDULE, use_cache: bool = True):
        self.model = model
        self.config = model.config
        self.schedule = check_schedule(schedule)
        self.use_cache = use_cache
        self.groups: list[_Group] = []
        self.seq_len = 0  # columns fed so far, padding included
        self.batch_size = 0
        weight = next(model.parameters())
        self.native_kernels = weight.device.type == "cpu" and weight.dtype == torch.float32

    @property
    def started(self) -> bool:
        return bool(self.groups)

    def windows(self) -> list[Window]:
        """The window of each row (for inspection and tests)."""
        result: list[Window | None] = [None] * self.batch_size
        for group in self.groups:
            for row in group.rows.tolist():
                result[row] = group.window
        return result

    @contextlib.contextmanager
    def _kernels(self):
        """For fp32 on the CPU, ATen's own kernels instead of oneDNN's: oneDNN's set-up cost per call outweighs a
        single token's work (benchmarks/README.md); bf16 keeps oneDNN, whose matrix products use AMX. The flag is
        global, so it is restored after every call."""
        enabled = torch.backends.mkldnn.enabled
        try:
            torch.backends.mkldnn.enabled = enabled and not self.native_kernels
            yield
        finally:
            torch.backends.mkldnn.enabled = enabled

    def start(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, num_latents: int | None = None
    ) -> torch.Tensor:
        """Logits (B, V) of the token after each prompt of `input_ids` (B, N), or of token embeddings (B, N, C).
        `num_latents`: latents of the first window (default: as many as fit; see `first_window`)."""
        self.reset()
        return self.add(input_ids, attention_mask, num_latents)

    def add(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, num_latents: int | None = None
    ) -> torch.Tensor:
        """`start` for rows that join a running batch (continuous batching: a server's requests join between
        steps): the prompts of `input_ids` (B', N) become rows B to B + B' - 1, and their logits (B', V) are
        returned. The rows already running are untouched; the new ones form groups of their own (one per prompt
        length), so each runs as it would alone. `take_new_tokens` is for batches begun by `start` only."""
        b, n = input_ids.shape[:2]
        pads = left_padding(attention_mask, n) or [0] * b
        if max(pads) >= n:
            raise ValueError("a row of the batch has no token: every prompt needs at least one")
        first_row = self.batch_size
        if first_row == 0:
            self.seq_len = n
        by_length: dict[int, list[int]] = {}
        for row, pad in enumerate(pads):
            by_length.setdefault(n - pad, []).append(row)
        groups = []
        for length, rows in by_length.items():
            window = first_window(length, self.config, num_latents)
            index = torch.tensor(rows, device=input_ids.device)
            cache = self.model.empty_cache() if self.use_cache else None
            groups.append(_Group(index + first_row, input_ids[index, n - length :], window, cache, []))
        with self._kernels():
            logits = [self.model(*self._window(g), cache=g.cache)[:, -1] for g in groups]
        self.groups += groups
        self.batch_size += b
        return self._gather(groups, logits, b, first_row)

    @staticmethod
    def _window(group: _Group, kept: int = 0) -> tuple[torch.Tensor, int]:
        """The model inputs of a group's window from position `kept` on: tokens and prefix length."""
        return group.tokens[:, group.tokens.shape[1] - group.window.length + kept :], group.window.prefix_len - kept

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens` (B,) to the rows and return the logits (B, V) of the token after them."""
        self.seq_len += 1
        with self._kernels():
            return self._gather(self.groups, [self._step_group(g, tokens[g.rows]) for g in self.groups])

    def extend(self, tokens: torch.Tensor, after_step: Callable[[], None] | None = None) -> torch.Tensor:
        """Append `tokens` (B, t) one step at a time; the logits (B, t, V) after each of them. `after_step()` is
        called after each step (to look at the windows)."""
        logits = []
        for i in range(tokens.shape[1]):
            logits.append(self.step(tokens[:, i]))
            if after_step is not None:
                after_step()
        return torch.stack(logits, dim=1)

    def window_inputs(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """(rows, window tokens, prefix length) of each group: what a full pass over the current windows takes."""
        return [(group.rows, *self._window(group)) for group in self.groups]

    def _step_group(self, group: _Group, tokens: torch.Tensor) -> torch.Tensor:
        old = group.window
        group.window, fresh = advance_window(old, self.config, self.schedule)
        group.history.append((old, fresh))
        new = tokens[:, None]
        if group.tokens.is_floating_point():  # a prompt given as embeddings: the window is kept as embeddings
            new = self.model.input_adapter.txt_embedding(new)
        group.tokens = torch.cat([group.tokens, new], dim=1)
        if group.cache is None:
            return self.model(*self._window(group))[:, -1]
        if fresh or group.stale:  # latents joined the prefix or tokens left: rebuild what the cache cannot keep
            kept = 0 if group.stale else reusable_prefix(old, group.window)
            group.cache.keep_prefix(kept)
            group.stale = False
            return self.model(*self._window(group, kept), cache=group.cache)[:, -1]
        return self.model.step(tokens, group.cache)

    def crop(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` steps (assisted decoding rejects draft tokens). The cache is truncated when
        those steps only grew the window; otherwise the next step rebuilds it."""
        if num_tokens == 0:
            return
        for group in self.groups:
            if num_tokens > len(group.history):
                raise ValueError(f"cannot crop {num_tokens} tokens: only {len(group.history)} were generated")
            undone = group.history[-num_tokens:]
            del group.history[-num_tokens:]
            group.window = undone[0][0]
            group.tokens = group.tokens[:, :-num_tokens]
            if group.cache is not None and not group.stale:
                if any(fresh for _, fresh in undone):
                    group.stale = True
                else:
                    cache = group.cache
                    cache.cross_attention.truncate(len(cache.cross_attention) - num_tokens)
                    for kv_cache in cache.self_attention:
                        kv_cache.truncate(len(kv_cache) - num_tokens)
        self.seq_len -= num_tokens

    def take_new_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The tokens of `input_ids` (B, T), the whole sequences so far, that the stepper has not seen; the rows'
        older tokens are taken from it too: without a cache, transformers' beam search reorders the sequences
        between steps and passes all of them. (After a prompt given as embeddings, transformers passes the
        generated tokens only, and cannot reorder the prompt.)"""
        if self.groups[0].tokens.is_floating_point():
            return input_ids[:, len(self.groups[0].history) :]
        for group in self.groups:
            group.tokens = input_ids[group.rows, self.seq_len - group.tokens.shape[1] : self.seq_len]
        return input_ids[:, self.seq_len :]

    def reset(self) -> None:
        self.groups, self.seq_len, self.batch_size = [], 0, 0

    def _gather(
        self, groups: list[_Group], logits: list[torch.Tensor], batch_size: int | None = None, first_row: int = 0
    ) -> torch.Tensor:
        """The logits (batch_size, V) of rows first_row .. first_row + batch_size - 1 (default: all), from the
        logits of the groups that hold them."""
        batch_size = self.batch_size if batch_size is None else batch_size
        if len(groups) == 1 and groups[0].rows.shape[0] == batch_size:
            rows = groups[0].rows
            if torch.equal(rows, torch.arange(first_row, first_row + batch_size, device=rows.device)):
                return logits[0]
        out = logits[0].new_empty(batch_size, logits[0].shape[-1])
        for group, group_logits in zip(groups, logits):
            out[group.rows - first_row] = group_logits
        return out

    def select(self, index: torch.Tensor) -> None:
        """Make row i a copy of row index[i] (beam search's reordering, copies of one prompt, rows that leave)."""
        index = index.to(self.groups[0].rows.device)
        group_of = torch.empty(self.batch_size, dtype=torch.long, device=index.device)
        position = torch.empty_like(group_of)  # a row's place within its group
        for g, group in enumerate(self.groups):
            group_of[group.rows] = g
            position[group.rows] = torch.arange(group.rows.shape[0], device=index.device)
        new_groups = []
        for g, group in enumerate(self.groups):
            rows = (group_of[index] == g).nonzero()[:, 0]  # new rows whose source is in this group
            if rows.numel() == 0:
                continue
            local = position[index[rows]]
            unchanged = local.shape[0] == group.rows.shape[0] and torch.equal(
                local, torch.arange(local.shape[0], device=local.device)
            )
            if not unchanged:  # (rows that keep their place and company keep their tensors: no copy)
                group.tokens = group.tokens[local]
                if group.cache is not None:
                    for kv_cache in [group.cache.cross_attention, *group.cache.self_attention]:
                        kv_cache.select(local)
            group.rows = rows
            new_groups.append(group)
        self.groups = new_groups
        self.batch_size = index.shape[0]

    def repeat_interleave(self, repeats: int) -> None:
        """Each row becomes `repeats` consecutive rows (num_return_sequences, beams)."""
        self.select(torch.arange(self.batch_size).repeat_interleave(repeats))
