"""Evaluation of a trained model on a text split: loss, perplexity and bits per byte for a causal LM, masked-token
loss and accuracy for a masked LM.

Causal LM. The documents are tokenized as for training (each followed by the end-of-text token) and joined into
one stream that starts with an end-of-text token, as if a previous document had just ended: so every token of every
document, and every end-of-text token, is predicted, and none is predicted from nothing. The stream is scored with a
strided sliding window (as in Hugging Face's perplexity guide; `perceiver_cli.models.clm.windows.scoring_windows`):
windows of up to `max_seq_len` tokens, each `max_latents` tokens (the stride) further than the last, each scoring
only the tokens the previous window did not score, all of them at latent positions (Perceiver AR predicts from
latents only; as in training, the latents of a window are its last `max_latents` positions, of which the last
`stride` are scored). Every token is scored exactly once, with a context of `max_seq_len - max_latents + 1` to
`max_seq_len` tokens once the stream is that long.

With a context N (`--context`), the windows are min(N, max_seq_len) tokens long and the stride min(max_latents,
N // 4), at least 1: every token is scored with N - stride + 1 to N tokens of context, about 3/4 N to N. A context
curve (`--context-curve`) repeats that for N = 64, 256, 1024, ... and the window, to show how much the model gains
from the context it reads.

Bits per byte = total negative log-likelihood / ln 2 / bytes, where bytes are the UTF-8 bytes of the documents plus
one per end-of-text token (the separator, like the newline between documents in a text file). It does not depend on
the tokenizer, so models with different tokenizers compare; with the "utf8" tokenizer a token is a byte, and bits
per byte is the loss / ln 2.

Masked LM. Chunks as in training, masked as in training's validation: static masks drawn from the seed and each
chunk's index, so a run's evaluation repeats exactly. Loss and accuracy are over the selected tokens (BERT's 80/10/10
rule: most became [MASK], some a random token, some stayed). Perplexity is not reported: a masked LM defines no
probability of a text. Word accuracy is what `perceiver fill-mask` shows a user: words of the split (runs of
letters), drawn from the seed, each masked alone (one mask token per token of the word) in its chunk, and counted
when the most likely token at every masked position is the word's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from perceiver_cli.data.masking import IGNORE_INDEX
from perceiver_cli.errors import UserError
from perceiver_cli.models.clm.windows import left_pad, scoring_windows

Progress = Callable[[int, int], None]  # (batches done, batches in all)

# ---------------------------------------------------------------------------------------------------------------
# Causal LM
# ---------------------------------------------------------------------------------------------------------------


def clm_token_stream(tokenizer, texts: list[str]) -> tuple[list[int], int]:
    """(token ids of `[EOS] doc1 [EOS] doc2 [EOS] ...`, UTF-8 bytes of the scored text). Empty documents are left
    out, as in training."""
    from perceiver_cli.data.pipeline import _Tokenize

    tokenize = _Tokenize(tokenizer)  # the training pipeline's tokenization, separator included
    if tokenize.separator is None:
        raise UserError("this tokenizer has no end-of-text or separator token, which evaluation needs between texts")
    texts = [text for text in texts if text and not text.isspace()]
    stream = [tokenize.separator]
    for start in range(0, len(texts), 1000):
        for ids in tokenize({"text": texts[start : start + 1000]})["input_ids"]:
            stream.extend(ids)
    num_bytes = sum(len(text.encode("utf-8")) + 1 for text in texts)  # + 1: the separator after each document
    return stream, num_bytes


def context_window(
    max_seq_len: int, max_latents: int, context: int | None = None, stride: int | None = None
) -> tuple[int, int]:
    """(window length, stride) that score every token with at most `context` tokens of context: windows of
    min(context, max_seq_len) tokens, each scoring its last min(max_latents, context // 4) (at least 1), so that a
    token sees between about 3/4 of the context and all of it. Without a context: the model's own window and
    latents, the most context it reads. `stride` instead scores the last `stride` latents of each window (at most
    the latents): each scored token sees at least window - stride tokens, and the latents before it, at the cost of
    a pass per `stride` tokens (a latent early in the latents sees the prefix through one cross-attention only)."""
    if context is not None and not 1 <= context <= max_seq_len:
        raise UserError(f"--context must be 1 to the model's window ({max_seq_len} tokens), got {context}")
    length = max_seq_len if context is None else min(context, max_seq_len)
    if stride is not None:
        most = min(max_latents, length)
        if not 1 <= stride <= most:
            raise UserError(f"--stride must be 1 to {most} (the model's latents, at most the window), got {stride}")
        return length, stride
    if context is None:
        return max_seq_len, max_latents
    return length, min(max_latents, max(1, context // 4))


def curve_contexts(max_seq_len: int) -> list[int]:
    """The contexts of a context curve: 64, 256, 1024, ... (powers of 4 from 64) below the window, and the window."""
    contexts = []
    context = 64
    while context < max_seq_len:
        contexts.append(context)
        context *= 4
    return contexts + [max_seq_len]


def evaluate_clm(
    model,
    stream: list[int],
    num_bytes: int,
    batch_size: int,
    pad_token_id: int = 0,
    progress: Progress | None = None,
    context: int | None = None,
    stride: int | None = None,
) -> dict:
    """Loss (nats per token), perplexity and bits per byte of `stream` (see `clm_token_stream`), every token scored
    once by the strided window, with at most `context` tokens of context when given, and `stride` tokens scored per
    window when given (see `context_window`)."""
    if len(stream) < 2:
        raise UserError("there is no text to evaluate: the split has no non-empty document")
    length, stride = context_window(model.max_seq_len, model.max_latents, context, stride)
    device = next(model.parameters()).device
    tokens = torch.tensor(stream, dtype=torch.long, device=device)
    # Input positions 0 .. N-2 of the stream, position i predicting token i + 1; in a window lo .. hi-1, the last k.
    windows = scoring_windows(len(stream) - 1, length, stride)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    total_nll, num_scored = 0.0, 0
    model.eval()
    for done, batch in enumerate(batches, start=1):
        # The windows of a batch left-padded to the same length n. The latents are the last max_latents positions,
        # as in training (the prefix/latent split changes what the model computes); the last k of them are scored.
        x, pad_mask = left_pad([tokens[lo:hi] for lo, hi, _ in batch], pad_token_id)  # (W, n)
        labels = torch.full_like(x, IGNORE_INDEX)
        for row, (_, hi, k) in enumerate(batch):
            labels[row, x.shape[1] - k :] = tokens[hi - k + 1 : hi + 1]  # only the tokens no earlier window scored
        prefix_len = max(0, x.shape[1] - model.max_latents)
        with torch.inference_mode():
            logits = model(x, prefix_len, pad_mask=pad_mask)
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels[:, prefix_len:].flatten(), reduction="sum")
        total_nll += nll.item()
        num_scored += sum(k for _, _, k in batch)
        if progress is not None:
            progress(done, len(batches))
    loss = total_nll / num_scored
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nll / math.log(2) / num_bytes,
        "tokens": num_scored,
        "bytes": num_bytes,
        "window": length,
        "stride": stride,
        **({"context": context} if context is not None else {}),
    }


def evaluate_context_curve(
    model,
    stream: list[int],
    num_bytes: int,
    batch_size: int,
    pad_token_id: int = 0,
    progress: Progress | None = None,
) -> list[dict]:
    """`evaluate_clm` at each context of `curve_contexts`: how much the model gains from more context. One
    {context, stride, loss, bits_per_byte, tokens} per context, shortest first."""
    curve = []
    for context in curve_contexts(model.max_seq_len):
        result = evaluate_clm(model, stream, num_bytes, batch_size, pad_token_id, progress, context)
        curve.append({key: result[key] for key in ("context", "stride", "loss", "bits_per_byte", "tokens")})
    return curve


def evaluate_clm_generation(
    model, stream: list[int], schedule: str, use_cache: bool = True, batch_size: int = 8, progress: Progress | None = None
) -> dict:
    """Loss and bits per token of `stream` scored as generation sees it: the stream is cut into `batch_size`
    segments, and each is fed token by token to the generation stepper under window `schedule` (teacher forcing),
    every token scored by the logits the step before it returned. So it measures the context a schedule gives
    generated tokens, and the speed of its steps. With the "utf8" tokenizer a token is a byte."""
    import time

    from perceiver_cli.models.clm.decoding import WindowStepper

    length = (len(stream) - 1) // batch_size  # tokens scored per segment
    if length < 1:
        raise UserError("there is not enough text to evaluate: give more documents or a smaller --batch-size")
    device = next(model.parameters()).device
    # Segment i is tokens i * length .. (i + 1) * length: its first token is the prompt, the rest are scored.
    segments = torch.tensor(stream[: batch_size * length + 1], device=device).unfold(0, length + 1, length)
    stepper = WindowStepper(model, schedule, use_cache)
    model.eval()
    total_nll = 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        logits = stepper.start(segments[:, :1])
        for i in range(1, length + 1):
            total_nll += F.cross_entropy(logits.float(), segments[:, i], reduction="sum").item()
            if i < length:
                logits = stepper.step(segments[:, i])
            if progress is not None and i % 100 == 0:
                progress(i, length)
    seconds = time.perf_counter() - start
    num_scored = batch_size * length
    loss = total_nll / num_scored
    return {
        "loss": loss,
        "bits_per_token": loss / math.log(2),
        "tokens": num_scored,
        "schedule": schedule,
        "use_cache": use_cache,
        "tokens_per_second": num_scored / seconds,
    }


# ---------------------------------------------------------------------------------------------------------------
# Masked LM
# ---------------------------------------------------------------------------------------------------------------


def evaluate_mlm(
    model,
    tokenizer,
    chunks,
    batch_size: int,
    mask_prob: float = 0.15,
    whole_word_masking: bool = True,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict:
    """Masked-token loss and accuracy over `chunks` (one split of `tokenize_and_chunk(task="mlm")`)."""
    from perceiver_cli.data.collators import MLMCollator
    from perceiver_cli.models.mlm.positions import masked_positions

    if chunks.num_rows == 0:
        raise UserError("there is no text to evaluate: the split has no non-empty document")
    collate = MLMCollator(tokenizer, mask_prob, whole_word_masking, static_masking=True, seed=seed)
    rows = chunks.with_format("numpy")
    device = next(model.parameters()).device
    starts = range(0, rows.num_rows, batch_size)
    total_nll, num_correct, num_masked = 0.0, 0, 0
    model.eval()
    for done, start in enumerate(starts, start=1):
        stop = min(start + batch_size, rows.num_rows)
        ids = rows[start:stop]["input_ids"]
        batch = collate([{"input_ids": row, "index": i} for i, row in zip(range(start, stop), ids)])
        labels = batch["labels"]  # (B, M), IGNORE_INDEX where nothing was selected
        # Decode the selected positions only, as training does; the tail of rows with fewer selections points at
        # unselected positions, whose label IGNORE_INDEX leaves them out below.
        positions = masked_positions(labels)  # (B, S)
        pad_mask = batch["pad_mask"]
        with torch.inference_mode():
            logits = model(
                batch["input_ids"].to(device),
                pad_mask.to(device) if pad_mask.any() else None,
                output_positions=positions.to(device),
            )  # (B, S, V)
        targets = labels.gather(1, positions).to(device)  # (B, S)
        keep = targets != IGNORE_INDEX
        total_nll += F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum").item()
        num_correct += int((logits[keep].argmax(dim=-1) == targets[keep]).sum())
        num_masked += int(keep.sum())
        if progress is not None:
            progress(done, len(starts))
    return {
        "loss": total_nll / num_masked,
        "accuracy": num_correct / num_masked,
        "masked_tokens": num_masked,
        "sequences": rows.num_rows,
    }


def evaluate_word_fill(model, tokenizer, chunks, num_words: int = 500, seed: int = 0, batch_size: int = 16) -> dict:
    """Share of `num_words` words of `chunks` that the model fills exactly when each is masked alone (module doc).
    A word is a whole-word-masking unit of letters only, with regular tokens on both sides (so not cut by the chunk's
    edge); the draw depends on `seed` and the chunks only."""
    from perceiver_cli.data.masking import WordUnits

    units = WordUnits(tokenizer, whole_words=True)
    rows = chunks.with_format("numpy")
    words = []  # (chunk index, first position, length) of every candidate word
    for index in range(rows.num_rows):
        ids = torch.as_tensor(rows[index]["input_ids"], dtype=torch.long)
        special = units.special[ids]
        for start, length in units.spans(ids):
            stop = start + length
            if start == 0 or stop >= len(ids) or special[start - 1] or special[stop]:
                continue  # at the chunk's edge or beside a special token: perhaps a cut word
            if tokenizer.decode(ids[start:stop].tolist()).isalpha():
                words.append((index, start, length))
    if not words:
        raise UserError("there is no word to fill: the split has no run of letters between other tokens")
    order = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed))[:num_words].tolist()
    chosen = [words[i] for i in order]

    device = next(model.parameters()).device
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    by_length: dict[int, list] = {}  # one output shape per batch
    for word in chosen:
        by_length.setdefault(word[2], []).append(word)
    model.eval()
    correct = 0
    for group in by_length.values():
        for first in range(0, len(group), batch_size):
            batch = group[first:first + batch_size]
            inputs = [torch.as_tensor(rows[index]["input_ids"], dtype=torch.long) for index, _, _ in batch]
            x = torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True, padding_value=pad_token_id)  # (B, M)
            pad_mask = torch.nn.utils.rnn.pad_sequence(
                [torch.zeros(len(ids), dtype=torch.bool) for ids in inputs], batch_first=True, padding_value=True
            )  # (B, M), True at padding
            positions = torch.stack([torch.arange(start, start + length) for _, start, length in batch])  # (B, L)
            targets = x.gather(1, positions)  # (B, L)
            x.scatter_(1, positions, tokenizer.mask_token_id)
            with torch.inference_mode():
                logits = model(
                    x.to(device), pad_mask.to(device) if pad_mask.any() else None, output_positions=positions.to(device)
                )  # (B, L, V)
            correct += int((logits.argmax(dim=-1).cpu() == targets).all(dim=1).sum())
    return {"word_accuracy": correct / len(chosen), "words": len(chosen)}
