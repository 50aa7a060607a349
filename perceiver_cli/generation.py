"""Text generation with a Perceiver AR causal LM: sampling rules, the generation protocol with its key/value cache,
and incremental decoding of generated tokens into text.

`perceiver generate` and training's validation samples both call `generate`; `perceiver serve` runs
`ContinuousBatch`, the same sampling and stepper for prompts that join and leave a running batch. Nothing here knows
the command line or HTTP.

The generation protocol is `perceiver_cli.models.clm.decoding.WindowStepper`'s, the stepper the Hugging Face export's
`generate()` runs too: the model sees a window of at most `max_seq_len` tokens, its last tokens the latents (the
positions it predicts from); the window schedule (`--schedule`) says how the window moves as tokens are added, and
the key/value cache makes most steps cost one latent's computation, exactly (`use_cache=False` gives the same tokens).

Shapes: B sequences, n window length, V vocabulary.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from perceiver_cli.errors import UserError
from perceiver_cli.models.clm.decoding import WindowStepper
from perceiver_cli.models.clm.model import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_cli.models.clm.windows import DEFAULT_SCHEDULE, check_schedule, first_window, left_pad

# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    """How to generate; the names and defaults of Hugging Face's `generate` where it has them."""

    max_new_tokens: int = 128
    do_sample: bool = True  # False: greedy decoding
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    num_return_sequences: int = 1
    seed: int | None = None  # None: a different draw on every call
    stop: tuple[str, ...] = ()  # generation of a sequence ends before the first of these strings
    stop_at_eos: bool = True  # the end-of-text token ends a sequence (training puts it between documents)
    num_latents: int | None = None  # initial latents; None: min(prompt length, max_latents)
    use_cache: bool = True
    schedule: str = DEFAULT_SCHEDULE  # the window schedule (see perceiver_cli.models.clm.windows.SCHEDULES)

    def validate(self, max_latents: int | None = None) -> None:
        """Raise a UserError naming the first setting out of range; num_latents is also checked against the model's
        `max_latents` when given."""
        _require(self.max_new_tokens >= 1, f"max-new-tokens must be at least 1, got {self.max_new_tokens}")
        _require(self.temperature > 0, f"temperature must be greater than 0, got {self.temperature}")
        _require(self.top_k >= 0, f"top-k must be 0 (off) or more, got {self.top_k}")
        _require(0 < self.top_p <= 1, f"top-p must be greater than 0 and at most 1, got {self.top_p}")
        penalty, copies = self.repetition_penalty, self.num_return_sequences
        _require(penalty > 0, f"repetition-penalty must be greater than 0, got {penalty}")
        _require(copies >= 1, f"num-return-sequences must be at least 1, got {copies}")
        _require(
            self.do_sample or self.num_return_sequences == 1,
            "greedy decoding would return identical sequences: use sampling for num-return-sequences > 1",
        )
        _require(all(self.stop), "stop strings must not be empty")
        check_schedule(self.schedule, UserError)
        if self.num_latents is not None:
            _require(self.num_latents >= 1, f"num-latents must be at least 1, got {self.num_latents}")
            _require(
                max_latents is None or self.num_latents <= max_latents,
                f"num-latents must be at most the model's max_latents ({max_latents}), got {self.num_latents}",
            )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def initial_num_latents(prompt_len: int, config: CausalLanguageModelConfig, num_latents: int | None) -> int:
    """Latents of the first window: the requested number (default: as many as fit), at most the prompt length,
    and at least what the prefix cannot hold."""
    return first_window(prompt_len, config, num_latents).num_latents


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------


def process_logits(logits: torch.Tensor, seen: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """Next-token logits (B, V) after the repetition penalty and, when sampling, temperature, top-k and top-p, in
    the order Hugging Face applies them. `seen` (B, V) is True for tokens already in a sequence."""
    if settings.repetition_penalty != 1.0:
        # CTRL's penalty as in Hugging Face: a seen token's logit moves towards "less likely" whatever its sign.
        penalised = torch.where(logits > 0, logits / settings.repetition_penalty, logits * settings.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if not settings.do_sample:
        return logits
    logits = logits / settings.temperature
    if settings.top_k > 0:
        top_k = min(settings.top_k, logits.shape[-1])
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if settings.top_p < 1.0:
        # Keep the most likely tokens until their probabilities sum to top_p (always at least one).
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (B, V): probability of the more likely tokens
        remove_sorted = mass_before >= settings.top_p
        remove = remove_sorted.scatter(1, order, remove_sorted)  # back to vocabulary order
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens (B,) from processed logits (B, V): the most likely, or drawn from the softmax."""
    if not do_sample:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


class TokenSampler:
    """The next token of each of a prompt's `num_return_sequences` sequences, one step at a time: the logits
    processed by `process_logits`, then chosen by `choose_tokens` with the settings' random generator, which
    `settings.seed` seeds (None: a fresh draw), and the tokens each sequence holds for the repetition penalty (the
    prompt's count, as in Hugging Face). `generate_tokens` samples with one; the server's continuous batch with one
    per prompt, so that what runs beside a prompt never moves its draws."""

    def __init__(self, settings: GenerationSettings, prompt: torch.Tensor, vocab_size: int):
        self.settings = settings
        self.batch_size = settings.num_return_sequences
        self.generator = torch.Generator(prompt.device)
        if settings.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(settings.seed)
        self.seen = torch.zeros(self.batch_size, vocab_size, dtype=torch.bool, device=prompt.device)
        self.seen[:, prompt] = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next tokens (B,) from next-token logits (B, V)."""
        settings = self.settings
        tokens = choose_tokens(process_logits(logits, self.seen, settings), settings.do_sample, self.generator)
        if settings.repetition_penalty != 1.0:
            self.seen[torch.arange(self.batch_size, device=tokens.device), tokens] = True
        return tokens


def generate_tokens(
    model: CausalLanguageModel, prompt_ids: list[int], settings: GenerationSettings
) -> Iterator[torch.Tensor]:
    """Yield the next token of each of the `num_return_sequences` sequences (a (B,) tensor) as it is produced, up to
    `max_new_tokens` times. Stop strings and end-of-text are the caller's business (see `generate`): stop iterating
    when every sequence is done. A prompt longer than `max_seq_len` is cut to its last `max_seq_len` tokens."""
    if not prompt_ids:
        raise UserError("the prompt is empty: give the model at least one token to continue")
    device = next(model.parameters()).device
    prompt = torch.tensor(prompt_ids[-model.max_seq_len :], dtype=torch.long, device=device)
    batch_size = settings.num_return_sequences
    stepper = WindowStepper(model, settings.schedule, settings.use_cache)
    sample = TokenSampler(settings, prompt, model.config.vocab_size)

    with torch.inference_mode():
        logits = stepper.start(prompt[None], num_latents=settings.num_latents)
        # Every sequence starts from the same prompt: computed once, then tokens and cache are copied.
        stepper.repeat_interleave(batch_size)
    logits = logits.expand(batch_size, -1)
    for step in range(settings.max_new_tokens):
        tokens = sample(logits)
        yield tokens
        if step + 1 < settings.max_new_tokens:
            with torch.inference_mode():
                logits = stepper.step(tokens)


# ---------------------------------------------------------------------------------------------------------------
# Tokens -> text, one token at a time
# ---------------------------------------------------------------------------------------------------------------


class ByteDecoder:
    """UTF-8 text from the byte tokens of the "utf8" tokenizer (byte b has id b + num_special). An incomplete
    multi-byte character is held back until its last byte arrives; invalid bytes become U+FFFD; special tokens
    produce no text."""

    def __init__(self, num_special: int):
        self.num_special = num_special
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        byte = token_id - self.num_special
        return self.utf8.decode(bytes([byte])) if 0 <= byte < 256 else ""

    def flush(self) -> str:
        """The rest at the end of the sequence: an incomplete character becomes U+FFFD."""
        return self.utf8.decode(b"", final=True)


class SuffixDecoder:
    """Text from any tokenizer: decode all tokens so far and release what is new. A trailing U+FFFD is held back,
    as byte-level tokenizers show an incomplete character that way until its last byte arrives."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.released = 0  # characters of the decoded text released so far

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._release(self._decode().rstrip("\ufffd"))

    def flush(self) -> str:
        return self._release(self._decode())

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _release(self, text: str) -> str:
        new = text[self.released :]
        self.released += len(new)
        return new


def incremental_decoder(tokenizer) -> ByteDecoder | SuffixDecoder:
    from transformers import PerceiverTokenizer

    if isinstance(tokenizer, PerceiverTokenizer):
        return ByteDecoder(tokenizer._num_special_tokens)
    return SuffixDecoder(tokenizer)


class SequenceText:
    """The text of one generated sequence as tokens arrive. Text that might be the start of a stop string is held
    back until it is clear that it is not; the text ends before the first stop string, at end-of-text, or when
    `finish()` is called."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), eos_token_id: int | None = None):
        self.decoder = incremental_decoder(tokenizer)
        self.stop = stop
        self.eos_token_id = eos_token_id
        self.text = ""  # released so far
        self.pending = ""  # decoded but held back
        self.num_tokens = 0
        self.finish_reason: str | None = None  # "stop", "eos" or "length" once finished

    def add(self, token_id: int) -> str:
        """Take the next token; return the text it releases ("" once finished)."""
        if self.finish_reason is not None:
            return ""
        self.num_tokens += 1
        if token_id == self.eos_token_id:
            return self._finish("eos")
        return self._release(self.decoder.add(token_id))

    def finish(self) -> str:
        """End the sequence (max_new_tokens reached); return the text still held back."""
        return "" if self.finish_reason is not None else self._finish("length")

    def _finish(self, reason: str) -> str:
        released = self._release(self.decoder.flush(), final=True)
        if self.finish_reason is None:  # a stop string in the flushed text takes precedence
            self.finish_reason = reason
        return released

    def _release(self, new: str, final: bool = False) -> str:
        self.pending += new
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            released, self.pending = self.pending[: min(hits)], ""
            self.finish_reason = "stop"
        else:
            cut = len(self.pending) - (0 if final else _stop_prefix_len(self.pending, self.stop))
            released, self.pending = self.pending[:cut], self.pending[cut:]
        self.text += released
        return released


def _stop_prefix_len(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    return max((n for s in stop for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n])), default=0)


# ---------------------------------------------------------------------------------------------------------------
# Everything together
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class GeneratedSequence:
    text: str  # the generated text, without the prompt and without the stop string
    num_tokens: int  # generated tokens, including the end-of-text token or those of the stop string
    finish_reason: str  # "length", "stop" or "eos"


def generate(
    model: CausalLanguageModel,
    tokenizer,
    prompt_ids: list[int],
    settings: GenerationSettings,
    on_text: Callable[[int, str], None] | None = None,
) -> list[GeneratedSequence]:
    """Generate `settings.num_return_sequences` continuations of `prompt_ids`. `on_text(i, text)` is called with
    each piece of text of sequence i as soon as it is certain (for streaming)."""
    settings.validate(model.max_latents)
    eos = tokenizer.eos_token_id if settings.stop_at_eos else None
    sequences = [SequenceText(tokenizer, settings.stop, eos) for _ in range(settings.num_return_sequences)]

    def emit(i: int, text: str) -> None:
        if text and on_text is not None:
            on_text(i, text)

    was_training = model.training
    model.eval()  # no dropout; the cache refuses training mode
    try:
        for tokens in generate_tokens(model, prompt_ids, settings):
            for i, token in enumerate(tokens.tolist()):
                emit(i, sequences[i].add(token))
            if all(s.finish_reason is not None for s in sequences):
                break
    finally:
        model.train(was_training)
    for i, sequence in enumerate(sequences):
        emit(i, sequence.finish())
    return [GeneratedSequence(s.text, s.num_tokens, s.finish_reason) for s in sequences]


# ---------------------------------------------------------------------------------------------------------------
# Continuous batching: prompts that join and leave a running batch
# ---------------------------------------------------------------------------------------------------------------


class BatchMember:
    """One prompt in a `ContinuousBatch`: its `num_return_sequences` rows, their sampler and their text so far."""

    def __init__(self, prompt_ids: list[int], settings: GenerationSettings, sampler: TokenSampler, tokenizer, key):
        self.prompt_ids = prompt_ids
        self.settings = settings
        self.sampler = sampler
        eos = tokenizer.eos_token_id if settings.stop_at_eos else None
        self.sequences = [SequenceText(tokenizer, settings.stop, eos) for _ in range(settings.num_return_sequences)]
        self.key = key  # the caller's: which request this prompt belongs to
        self.num_steps = 0  # tokens sampled per row so far
        self.reported = [False] * len(self.sequences)  # whether a row's finish has been returned by `step`
        self.done = False  # every row finished (or ended): the member has left the batch

    @property
    def num_rows(self) -> int:
        return len(self.sequences)

    def results(self) -> list[GeneratedSequence]:
        return [GeneratedSequence(s.text, s.num_tokens, s.finish_reason) for s in self.sequences]


@dataclass
class TextUpdate:
    """What one step released for one row: its new text (may be empty) and, on its last update, why it ended."""

    member: BatchMember
    index: int  # the row within the member, 0 to num_return_sequences - 1
    text: str
    finish_reason: str | None = None  # "length", "stop", "eos", or the reason given to `ContinuousBatch.end`


class ContinuousBatch:
    """`generate` for prompts that arrive while others are being generated, one token per step for all of them: the
    server's continuous batching. Prompts join between steps (`add`), each with its own settings, random generator
    and stop strings, and leave when their sequences are done or when ended (`end`: a client went away); one
    `WindowStepper` runs every row.

    A member samples as `generate` does for its prompt and settings alone (`TokenSampler`: its own seeded generator,
    its own repetition penalty), so the others never move its draws. Its rows run in the stepper's groups, which
    never mix rows of different windows: prompts added in one call that have the same length share a group and run
    as one batch (one pass per step for all of them); a prompt added alone (or alone of its length) is a group of its
    own, whose passes are `generate`'s, and gets `generate`'s tokens exactly. In a shared group a row's logits can
    differ from its logits alone in the last bits (batched matrix products round differently), so a sampled token
    differs only where a draw falls within such a rounding of a boundary between two tokens.

    Not thread-safe: one thread (the server's model thread) calls everything, under `torch.inference_mode()`.
    """

    def __init__(self, model: CausalLanguageModel, tokenizer, schedule: str = DEFAULT_SCHEDULE, use_cache: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.stepper = WindowStepper(model, schedule, use_cache)
        self.members: list[BatchMember] = []  # in row order: each member's rows follow the previous member's
        self.logits: torch.Tensor | None = None  # (B, V) the next-token logits of every row
        self.device = next(model.parameters()).device

    @property
    def num_rows(self) -> int:
        return sum(member.num_rows for member in self.members)

    def add(self, prompts: list[tuple[list[int], GenerationSettings, object]]) -> list[BatchMember]:
        """Start (prompt_ids, settings, key) triples: one pass over each prompt's window (prompts of one length
        together), and their rows join the batch. Settings must use the batch's schedule and cache setting; a
        prompt longer than `max_seq_len` keeps its last `max_seq_len` tokens, as in `generate`."""
        stepper = self.stepper
        new_members, new_logits = [], []
        by_latents: dict[int | None, list[int]] = {}  # the stepper starts one num_latents per call
        for i, (prompt_ids, settings, _) in enumerate(prompts):
            settings.validate(self.model.max_latents)
            if settings.schedule != stepper.schedule or settings.use_cache != stepper.use_cache:
                raise ValueError("every prompt of a batch must use the batch's schedule and cache setting")
            if not prompt_ids:
                raise UserError("the prompt is empty: give the model at least one token to continue")
            by_latents.setdefault(settings.num_latents, []).append(i)
        order = [i for indices in by_latents.values() for i in indices]
        for num_latents, indices in by_latents.items():
            pieces = [
                torch.tensor(prompts[i][0][-self.model.max_seq_len :], dtype=torch.long, device=self.device)
                for i in indices
            ]
            input_ids, pad_mask = left_pad(pieces)
            attention_mask = None if pad_mask is None else ~pad_mask
            new_logits.append(stepper.add(input_ids, attention_mask, num_latents=num_latents))
            for i, prompt in zip(indices, pieces):
                prompt_ids, settings, key = prompts[i]
                sampler = TokenSampler(settings, prompt, self.model.config.vocab_size)
                new_members.append(BatchMember(prompt_ids, settings, sampler, self.tokenizer, key))
        # Each prompt's row becomes num_return_sequences rows: computed once, then tokens and cache are copied.
        first_new = stepper.batch_size - len(prompts)
        copies = torch.tensor([m.num_rows for m in new_members], device=self.device)
        rows = torch.arange(first_new, stepper.batch_size, device=self.device).repeat_interleave(copies)
        if not torch.equal(copies, torch.ones_like(copies)):
            stepper.select(torch.cat([torch.arange(first_new, device=self.device), rows]))
        logits = torch.cat(new_logits).repeat_interleave(copies, dim=0)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.members += new_members
        by_prompt = dict(zip(order, new_members))
        return [by_prompt[i] for i in range(len(prompts))]

    def step(self) -> list[TextUpdate]:
        """Sample the next token of every row and return the text it releases; members whose sequences are all done
        (or that reached max_new_tokens) leave, and the others' windows take their new tokens."""
        updates: list[TextUpdate] = []
        kept_tokens = []
        kept = []
        start = 0
        for member in self.members:
            end = start + member.num_rows
            tokens = member.sampler(self.logits[start:end])
            member.num_steps += 1
            for i, token in enumerate(tokens.tolist()):
                sequence = member.sequences[i]
                text = sequence.add(token)
                if sequence.finish_reason is not None and not member.reported[i]:
                    member.reported[i] = True
                    updates.append(TextUpdate(member, i, text, sequence.finish_reason))
                elif text:
                    updates.append(TextUpdate(member, i, text))
            if member.num_steps >= member.settings.max_new_tokens or all(member.reported):
                updates += self._finish(member, None)
            else:
                kept.append(member)
                kept_tokens.append(tokens)
            start = end
        if len(kept) < len(self.members):
            self._keep(kept)
        if self.members:
            self.logits = self.stepper.step(torch.cat(kept_tokens))
        return updates

    def end(self, member: BatchMember, reason: str | None = None) -> list[TextUpdate]:
        """Make `member` leave now: its rows still running end with `reason` (and the text they held back), or
        silently when `reason` is None (nobody is listening)."""
        if member.done:
            return []
        updates = self._finish(member, reason) if reason is not None else []
        member.done = True
        self._keep([m for m in self.members if m is not member])
        return updates

    def _finish(self, member: BatchMember, reason: str | None) -> list[TextUpdate]:
        """The last update of each row not yet finished: what it held back, and `reason` (None: max_new_tokens)."""
        updates = []
        for i, sequence in enumerate(member.sequences):
            if not member.reported[i]:
                text = sequence.finish()
                if reason is not None:
                    sequence.finish_reason = reason
                member.reported[i] = True
                updates.append(TextUpdate(member, i, text, sequence.finish_reason))
        member.done = True
        return updates

    def _keep(self, members: list[BatchMember]) -> None:
        """Keep these members' rows (in order), drop the others'."""
        starts, start = {}, 0
        for member in self.members:
            starts[id(member)] = start
            start += member.num_rows
        self.members = members
        if not members:
            self.stepper.reset()
            self.logits = None
            return
        index = torch.cat(
            [torch.arange(starts[id(m)], starts[id(m)] + m.num_rows, device=self.device) for m in members]
        )
        self.stepper.select(index)
        self.logits = self.logits[index]
