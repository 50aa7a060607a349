"""Text generation with a Perceiver AR causal LM: sampling rules, the generation protocol with its key/value cache,
and incremental decoding of generated tokens into text.

`perceiver generate` and training's validation samples both call `generate`; nothing here knows the command line.

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
from perceiver_cli.models.clm.windows import DEFAULT_SCHEDULE, check_schedule, first_window

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

    generator = torch.Generator(device)
    if settings.seed is None:
        generator.seed()
    else:
        generator.manual_seed(settings.seed)
    # Which tokens each sequence holds, for the repetition penalty (prompt tokens count, as in Hugging Face).
    seen = torch.zeros(batch_size, model.config.vocab_size, dtype=torch.bool, device=device)
    seen[:, prompt] = True

    with torch.inference_mode():
        logits = stepper.start(prompt[None], num_latents=settings.num_latents)
        # Every sequence starts from the same prompt: computed once, then tokens and cache are copied.
        stepper.repeat_interleave(batch_size)
    logits = logits.expand(batch_size, -1)
    for step in range(settings.max_new_tokens):
        tokens = choose_tokens(process_logits(logits, seen, settings), settings.do_sample, generator)
        if settings.repetition_penalty != 1.0:
            seen[torch.arange(batch_size, device=device), tokens] = True
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
