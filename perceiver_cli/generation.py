"""Text generation with a Perceiver AR causal LM: sampling rules, the generation protocol with its key/value cache,
and incremental decoding of generated tokens into text.

`perceiver generate` and training's validation samples both call `generate`; nothing here knows the command line.

The generation protocol. The model sees a window of at most `max_seq_len` tokens; its last tokens are the latents
(the positions it predicts from), the earlier ones the prefix. The prompt's last `num_latents` tokens start as
latents; each new token is one more latent, until the latents (`max_latents`) or the window (`max_seq_len`) are full.
Then half of the latents join the prefix at once and, when the prefix is full, its oldest tokens leave the window
(see `perceiver_cli.models.clm.next_window`).

The key/value cache makes each new token cost one latent's computation instead of a forward pass over the window,
and it is exact: while latents are added, the cached keys and values are what a full pass computes; when latents
join the prefix or tokens leave, one pass rebuilds the cache: over the latents and the tokens that joined the prefix
when the window grew in place (the older prefix keeps its keys and values), over the whole window when it slid.
`use_cache=False` runs the full pass at every step over the same windows, and so produces the same tokens.

Shapes: B sequences, n window length, V vocabulary.
"""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from perceiver_cli.errors import UserError
from perceiver_cli.models.clm import (
    CausalLanguageModel,
    CausalLanguageModelConfig,
    Window,
    first_window,
    next_window,
    reusable_prefix,
)

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


# ---------------------------------------------------------------------------------------------------------------
# The generation protocol and its key/value cache
# ---------------------------------------------------------------------------------------------------------------


class PerceiverARDecoder:
    """Feeds a growing sequence to a `CausalLanguageModel` token by token and returns next-token logits.

    `tokens` (B, n) is the window the model sees and `window` its length and latents. `start()` runs the prompt
    (computed once and copied to the B sequences), `step(tokens)` appends one token per sequence.
    """

    def __init__(
        self, model: CausalLanguageModel, prompt: torch.Tensor, num_latents: int, batch_size: int, use_cache: bool
    ):
        n = prompt.shape[-1]
        if not 1 <= n <= model.max_seq_len:
            raise ValueError(f"prompt length {n} must be between 1 and max_seq_len ({model.max_seq_len})")
        if not 1 <= num_latents <= min(n, model.max_latents) or n - num_latents > model.max_prefix_len:
            raise ValueError(f"{num_latents} latents do not fit a prompt of {n} tokens; see first_window")
        self.model = model
        self.tokens = prompt.reshape(1, n)
        self.window = Window(n, num_latents)
        self.batch_size = batch_size
        self.use_cache = use_cache
        self.cache = model.empty_cache() if use_cache else None
        weight = next(model.parameters())
        self.native_kernels = weight.device.type == "cpu" and weight.dtype == torch.float32

    @property
    def prefix_len(self) -> int:
        return self.window.prefix_len

    @contextlib.contextmanager
    def _inference(self):
        """Inference mode and, for fp32 on the CPU, ATen's own kernels instead of oneDNN's: oneDNN sets up every call
        (about 12 us for the GELU of one token), which made a cached step 12% slower; bf16 keeps oneDNN, whose
        matrix products use AMX. The flag is global, so it is restored after every call."""
        enabled = torch.backends.mkldnn.enabled
        try:
            torch.backends.mkldnn.enabled = enabled and not self.native_kernels
            with torch.inference_mode():
                yield
        finally:
            torch.backends.mkldnn.enabled = enabled

    def start(self) -> torch.Tensor:
        """Logits (B, V) of the token after the prompt."""
        with self._inference():
            return self._start()

    def _start(self) -> torch.Tensor:
        logits = self.model(self.tokens, self.prefix_len, cache=self.cache)[:, -1]  # (1, V)
        if self.batch_size == 1:
            return logits
        # Every sequence starts from the same prompt: compute it once, then copy tokens and cache.
        copies = torch.zeros(self.batch_size, dtype=torch.long, device=self.tokens.device)
        self.tokens = self.tokens[copies]
        if self.cache is not None:
            for kv_cache in [self.cache.cross_attention, *self.cache.self_attention]:
                kv_cache.select(copies)
        return logits[copies]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens` (B,) to the window and return the logits (B, V) of the token after them."""
        with self._inference():
            return self._step(tokens)

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        old_window = self.window
        self.window, fresh = next_window(old_window, self.model.config)
        self.tokens = torch.cat([self.tokens, tokens[:, None]], dim=1)[:, -self.window.length :]
        if not self.use_cache:
            return self.model(self.tokens, self.prefix_len)[:, -1]
        if fresh:  # latents joined the prefix or tokens left the window: rebuild what the cache cannot keep
            kept = reusable_prefix(old_window, self.window)
            self.cache.keep_prefix(kept)
            return self.model(self.tokens[:, kept:], self.prefix_len - kept, cache=self.cache)[:, -1]
        return self.model.step(tokens, self.cache)


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
    num_latents = initial_num_latents(len(prompt_ids), model.config, settings.num_latents)
    batch_size = settings.num_return_sequences
    decoder = PerceiverARDecoder(model, prompt, num_latents, batch_size, settings.use_cache)

    generator = torch.Generator(device)
    if settings.seed is None:
        generator.seed()
    else:
        generator.manual_seed(settings.seed)
    # Which tokens each sequence holds, for the repetition penalty (prompt tokens count, as in Hugging Face).
    seen = torch.zeros(batch_size, model.config.vocab_size, dtype=torch.bool, device=device)
    seen[:, prompt] = True

    logits = decoder.start()
    for step in range(settings.max_new_tokens):
        tokens = choose_tokens(process_logits(logits, seen, settings), settings.do_sample, generator)
        if settings.repetition_penalty != 1.0:
            seen[torch.arange(batch_size, device=device), tokens] = True
        yield tokens
        if step + 1 < settings.max_new_tokens:
            logits = decoder.step(tokens)


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
