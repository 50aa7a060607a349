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
    if padding_side not in PADDING_SIDES:
        raise UserError(f"padding side {padding_side!r} is not supported: use 'left' or 'right'")
    if spec.strip().lower() in _UTF8_ALIASES:
        from transformers import PerceiverTokenizer

        tokenizer = PerceiverTokenizer()
    else:
        tokenizer = _load_local(spec)
    tokenizer.padding_side = padding_side
    return tokenizer


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

