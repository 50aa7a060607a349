"""The one place tokenizers are made: the built-in UTF-8 byte tokenizer, or a local Hugging Face tokenizer directory.

Nothing here touches the network. `PerceiverTokenizer.from_pretrained("deepmind/language-perceiver")` is avoided
on purpose: offline it silently falls back to defaults, and with an unreachable Hub it hangs for minutes. The byte
tokenizer needs no files at all, so it is constructed directly.
"""

from pathlib import Path

from perceiver_cli.errors import UserError, first_line

UTF8 = "utf8"
_UTF8_ALIASES = {"utf8", "utf-8"}
PADDING_SIDES = ("left", "right")
# save_pretrained always writes one of these; a directory without any of them is not a tokenizer.
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def load_tokenizer(spec: str = UTF8, padding_side: str = "right"):
    """Return a tokenizer for `spec`: "utf8" (bytes; ids: [PAD]=0 [BOS]=1 [EOS]=2 [MASK]=3 [CLS]=4 [SEP]=5,
    byte b -> b + 6) or the path of a local Hugging Face tokenizer directory."""
    check_padding_side(padding_side)
    if spec.strip().lower() in _UTF8_ALIASES:
        from transformers import PerceiverTokenizer

        tokenizer = PerceiverTokenizer()
    else:
        tokenizer = _load_local(spec)
    tokenizer.padding_side = padding_side
    return tokenizer


def check_padding_side(padding_side: str) -> None:
    if padding_side not in PADDING_SIDES:
        raise UserError(f"padding side {padding_side!r} is not supported: use 'left' or 'right'")


def encode_text(tokenizer, text):
    """Token ids of plain text (a str, or a list of them), the one tokenization of training documents and of
    generation prompts: no special tokens added, and a special token's string in the text ("[MASK]", "[EOS]")
    stays text. Texts longer than the model's maximum length are expected here (the caller chunks or cuts them),
    so the tokenizer's warning about them is off."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def vocab_size(tokenizer) -> int:
    """Number of token ids the model must embed. `tokenizer.vocab_size` leaves out added special tokens (for the
    UTF-8 tokenizer it says 256 while ids go up to 261), so use this instead."""
    return len(tokenizer)


def _load_local(spec: str):
    path = Path(spec).expanduser()
    # Only existing directories reach transformers: anything else (a Hub name like "bert-base-uncased", a typo)
    # would make it try the network.
    if not path.is_dir():
        raise UserError(
            f"tokenizer {spec!r} not found: use 'utf8' or a path to a local Hugging Face tokenizer directory",
            hint="Hub names are not downloaded; save the tokenizer with `save_pretrained(dir)` and pass that dir.",
        )
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError(
            f"tokenizer {spec!r} is a directory without tokenizer files ({', '.join(_TOKENIZER_FILES)}): "
            "use 'utf8' or a path to a local Hugging Face tokenizer directory (one written by save_pretrained)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for unusable directories
        raise UserError(
            f"tokenizer {spec!r} could not be loaded ({type(e).__name__}: {first_line(e)}): "
            "use 'utf8' or a path to a local Hugging Face tokenizer directory (one written by save_pretrained)"
        ) from e



# The key a tokenizer_config.json written by `causal_lm_tokenizer` carries, so that importing the directory again
# gives back the "utf8" tokenizer.
BYTE_TOKENIZER_MARK = "perceiver_tokenizer"


def causal_lm_tokenizer(spec: str, model_max_length: int):
    """The tokenizer of `spec` as an exported causal LM needs it: it adds no special tokens (a prompt goes to the
    model as the text's tokens, as in training; PerceiverTokenizer would wrap it in [CLS] ... [SEP]), pads on the
    left, and its `model_max_length` is the model's window.

    "utf8" becomes a `tokenizers` byte-level tokenizer with the same ids (special tokens 0-5, byte b -> b + 6),
    which stock transformers loads without remote code; its start-of-text token is [EOS], the document separator
    of training. A fast tokenizer of a directory loses its post-processor,
    the part that adds special tokens."""
    if spec.strip().lower() in _UTF8_ALIASES:
        tokenizer = _byte_level_tokenizer()
        tokenizer.init_kwargs[BYTE_TOKENIZER_MARK] = UTF8
    else:
        tokenizer = _load_local(spec)
        if getattr(tokenizer, "_tokenizer", None) is not None:
            tokenizer._tokenizer.post_processor = None
        elif tokenizer("a")["input_ids"] != tokenizer("a", add_special_tokens=False)["input_ids"]:
            raise UserError(
                f"tokenizer {spec!r} adds special tokens to every text and is not a fast tokenizer, so the exported "
                "causal LM would see them in every prompt",
                hint="save a fast tokenizer (tokenizer.json) in the tokenizer directory",
            )
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"
    tokenizer.model_max_length = model_max_length
    return tokenizer


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[BOS]", "[EOS]", "[MASK]", "[CLS]", "[SEP]"]  # PerceiverTokenizer's ids 0-5
    vocab = {token: i for i, token in enumerate(special)}
    vocab |= {char: byte + len(special) for byte, char in _byte_characters().items()}
    # A BPE without merges over the byte-level alphabet: every byte is one token.
    tokenizer = Tokenizer(models.BPE(vocab, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        # Training separates documents with [EOS], so a text starts after it: the start token that harnesses such
        # as lm-evaluation-harness put before a text.
        bos_token="[EOS]",
        eos_token="[EOS]",
        mask_token="[MASK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


def _byte_characters() -> dict[int, str]:
    """The byte-level alphabet of `tokenizers`' ByteLevel pre-tokenizer (GPT-2's): byte -> printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


# ---------------------------------------------------------------------------------------------------------------
# Training a byte-level BPE tokenizer on a corpus (`perceiver tokenizer train`)
# ---------------------------------------------------------------------------------------------------------------

# What the pipeline needs of a tokenizer: [PAD] pads batches, [EOS] ends every document (CLM and MLM), [MASK],
# [CLS] and [SEP] make masked-LM inputs ("[CLS] chunk [SEP]", as the fill-mask pipeline encodes a text). Ids 0-4.
BPE_SPECIAL_TOKENS = ("[PAD]", "[EOS]", "[MASK]", "[CLS]", "[SEP]")
BYTE_ALPHABET = 256


def min_bpe_vocab_size() -> int:
    """The smallest vocabulary a byte-level BPE can have: the special tokens and one token per byte."""
    return len(BPE_SPECIAL_TOKENS) + BYTE_ALPHABET


def train_bpe_tokenizer(texts, vocab_size: int, length: int | None = None, min_frequency: int = 2):
    """A byte-level BPE tokenizer (GPT-2's pre-tokenization: merges never cross a word, a space starts the word
    after it) trained on `texts` (an iterable of strings or of lists of strings; `length`: how many, for the
    progress) with at most `vocab_size` tokens: `BPE_SPECIAL_TOKENS` (ids 0-4), the 256 bytes, then the merges
    seen at least `min_frequency` times, most frequent first (a small corpus may give fewer). Lossless: every text
    encodes, with no unknown token, and decodes back exactly. Returns a PreTrainedTokenizerFast: `save_pretrained`
    writes the directory that `load_tokenizer` (and `data.tokenizer`) takes.

    Its start-of-text token is [EOS], as in the exported "utf8" tokenizer: training separates documents with it.
    `tokenizer(text)` wraps a text as [CLS] text [SEP] (as PerceiverTokenizer does, for fill-mask); the training
    pipeline and generation encode without special tokens, and a causal LM's export drops the wrapping."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < min_bpe_vocab_size():
        raise UserError(
            f"vocabulary size {vocab_size} is smaller than the byte alphabet: a byte-level BPE needs at least "
            f"{min_bpe_vocab_size()} tokens ({BYTE_ALPHABET} bytes and {len(BPE_SPECIAL_TOKENS)} special tokens)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not: nothing is unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        bos_token="[EOS]",
        eos_token="[EOS]",
        mask_token="[MASK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
