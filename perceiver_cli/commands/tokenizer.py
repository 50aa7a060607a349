"""`perceiver tokenizer train`: a byte-level BPE tokenizer trained on a run's own text, for `data.tokenizer`.

The text is what `perceiver train` would train on with the same preset and --set overrides: the [data] section's
source, path, name, config_name, text_column and document, split into train and validation with the same fraction
and the same trainer seed. Only the training split is read, never the validation split, so validation text stays
unseen by the tokenizer as it does by the model (and a validation loss measures both on new text).

Bits per byte stay comparable across tokenizers: `perceiver eval` divides the total negative log-likelihood by
ln 2 and by the UTF-8 bytes of the text, whatever the tokens are (perceiver_cli/evaluation.py).
"""

from pathlib import Path
from typing import Annotated

import typer

from perceiver_cli.errors import UserError

DEFAULT_VOCAB_SIZE = 4096
_SAMPLE_DOCS = 2000  # validation documents to measure bytes per token on

app = typer.Typer(help="Train a tokenizer on your corpus (for data.tokenizer).", no_args_is_help=True)


@app.command()
def train(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The tokenizer directory to write; then --set data.tokenizer=DIR.")
    ],
    preset: Annotated[
        str, typer.Option("--preset", "-p", help="Built-in preset name or .toml file whose [data] to read.")
    ] = "clm-small",
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a preset value: key.path=value (repeatable), e.g. data.path=..."),
    ] = None,
    vocab_size: Annotated[
        int, typer.Option("--vocab-size", help="Tokens in all: special tokens, the 256 bytes and the merges.")
    ] = DEFAULT_VOCAB_SIZE,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing --output directory.")] = False,
) -> None:
    """Train a byte-level BPE tokenizer on the training split of a preset's data (never its validation split)."""
    from perceiver_cli.data.tokenizer import min_bpe_vocab_size

    if vocab_size < min_bpe_vocab_size():
        raise UserError(
            f"--vocab-size {vocab_size} is smaller than the byte alphabet: a byte-level BPE needs at least "
            f"{min_bpe_vocab_size()} (256 bytes and the special tokens)"
        )
    if output.exists() and not force and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"--output {output} already exists: choose another directory or pass --force to replace it")

    from perceiver_cli.config import load_run_config
    from perceiver_cli.data.run_tokenizer import text_batches, train_bpe_on_split
    from perceiver_cli.data.sources import load_text_splits
    from perceiver_cli.data.tokenizer import encode_text
    from perceiver_cli.files import atomic_directory

    cfg, _ = load_run_config(preset, overrides or [])
    d = cfg.data
    splits = load_text_splits(**cfg.source_options())
    source = {"embedded": f"embedded corpus {d.name or 'prose'}", "files": f"files {d.path}",
              "hub": f"hub {d.name} {d.config_name or ''}".rstrip()}[d.source]
    typer.echo(f"training a byte-level BPE of {vocab_size:,} tokens on the training split of {source}", err=True)
    tokenizer, documents = train_bpe_on_split(splits["train"], vocab_size, source)
    # Existence was checked above: --force, or an empty directory (replaced). Written whole or not at all.
    with atomic_directory(output, force=True) as staging:
        tokenizer.save_pretrained(str(staging))

    sample = [text for texts in text_batches(splits["validation"], limit=_SAMPLE_DOCS) for text in texts]
    num_bytes = sum(len(text.encode("utf-8")) for text in sample)
    num_tokens = sum(len(ids) for ids in encode_text(tokenizer, sample)) if sample else 0
    compression = f"; {num_bytes / num_tokens:.2f} bytes per token on validation text" if num_tokens else ""
    fewer = (f" (not {vocab_size:,}: no more pairs occur twice in the text)" if len(tokenizer) < vocab_size else "")
    typer.echo(f"wrote {output}: {len(tokenizer):,} tokens from {documents:,} documents{fewer}{compression}")
    typer.echo(f"train with it: perceiver train --preset {preset} --set data.tokenizer={output}")
