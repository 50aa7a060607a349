"""`perceiver generate`: continue a prompt with a Perceiver AR causal LM, streaming the text to stdout.

Only the generated text goes to stdout (the prompt is not repeated), so it can be piped; warnings and timing go to
stderr. Prompts read from a file or standard input must be UTF-8 (anything else is refused rather than guessed at)
and lose one trailing newline, the one editors and `echo` add.
"""

import sys
from pathlib import Path
from typing import Annotated

import typer

from perceiver_cli.errors import UserError


def generate(
    prompt: Annotated[
        str | None,
        typer.Argument(help="The text to continue; '-' or nothing reads it from standard input.", show_default=False),
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the prompt from this UTF-8 file.")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Run directory, checkpoint file or exported model (default: the most recent clm run)."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="How many tokens to generate at most.")] = 128,
    do_sample: Annotated[
        bool, typer.Option("--do-sample/--greedy", help="Sample the next token, or always take the most likely.")
    ] = True,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (> 0); lower is more conservative.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens only (0: off).")] = 0,
    top_p: Annotated[
        float, typer.Option(help="Sample from the most likely tokens that make up this probability (1: off).")
    ] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="Penalise tokens already present (> 0; 1: off).")] = 1.0,
    num_return_sequences: Annotated[int, typer.Option(help="How many continuations to generate.")] = 1,
    seed: Annotated[int | None, typer.Option(help="Random seed, for reproducible sampling.")] = None,
    stop: Annotated[
        list[str] | None,
        typer.Option(metavar="<str>", help="End the text before this string (repeatable).", show_default=False),
    ] = None,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Go on past the end-of-text token (it ends a sequence by default).")
    ] = False,
    num_latents: Annotated[
        int | None,
        typer.Option(help="Latent positions at the end of the prompt, 1 to max_latents (default: as many as fit)."),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Run a full forward pass per token instead of using the cache.")
    ] = False,
    schedule: Annotated[
        str | None,
        typer.Option(
            help="How the window moves: chunked (latents grow to max_latents, then half of them join the prefix) "
            "or sliding (the perceiver-io library's rule: every step the last max_seq_len tokens, the latents "
            "their last max_latents). Default: chunked.",
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object per sequence.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")] = "cpu",
) -> None:
    """Generate text with a Perceiver AR causal language model."""
    import json
    import time

    from perceiver_cli.data.tokenizer import encode_text, load_tokenizer
    from perceiver_cli.generation import GenerationSettings, generate as run_generation, initial_num_latents
    from perceiver_cli.model_choice import choose_model, resolve_device

    settings = GenerationSettings(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        num_return_sequences=num_return_sequences,
        seed=seed,
        stop=tuple(stop or ()),
        stop_at_eos=not ignore_eos,
        num_latents=num_latents,
        use_cache=not no_cache,
        **({"schedule": schedule} if schedule is not None else {}),
    )
    settings.validate()  # before loading the model: bad options fail fast
    text = read_prompt(prompt, file)
    loaded = choose_model(model, "clm", device=resolve_device(device))
    config = loaded.config
    settings.validate(config.max_latents)
    tokenizer = load_tokenizer(loaded.tokenizer, padding_side="left")
    prompt_ids = encode_text(tokenizer, text)  # as training reads its documents
    if len(prompt_ids) > config.max_seq_len:
        _warn(
            f"the prompt has {len(prompt_ids)} tokens, more than the model's max_seq_len ({config.max_seq_len}): "
            f"using its last {config.max_seq_len} tokens"
        )
    latents = initial_num_latents(len(prompt_ids), config, num_latents)
    if num_latents is not None and latents > num_latents:
        _warn(f"using {latents} latents: with {num_latents}, the prompt would not fit the model's prefix")

    stream = not json_output and num_return_sequences == 1

    def on_text(_: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    start = time.perf_counter()
    sequences = run_generation(loaded.model, tokenizer, prompt_ids, settings, on_text=on_text if stream else None)
    seconds = time.perf_counter() - start
    total_tokens = sum(s.num_tokens for s in sequences)

    if json_output:
        for s in sequences:
            record = {
                "prompt": text,
                "text": s.text,
                "prompt_tokens": len(prompt_ids),
                "generated_tokens": s.num_tokens,
                "finish_reason": s.finish_reason,
                "seconds": round(seconds, 4),  # the whole generation: all sequences run together
                "tokens_per_second": round(s.num_tokens / seconds, 2),
            }
            print(json.dumps(record, ensure_ascii=False))
    elif stream:
        sys.stdout.write("\n")
    else:
        for i, s in enumerate(sequences, start=1):
            print(f"--- sequence {i}/{len(sequences)} ---")
            print(s.text)
    sys.stdout.flush()
    rate = total_tokens / seconds
    print(
        f"{len(prompt_ids)} prompt tokens, {total_tokens} generated tokens in {seconds:.2f} s ({rate:.1f} tokens/s)",
        file=sys.stderr,
    )


def read_prompt(prompt: str | None, file: Path | None) -> str:
    """The prompt from the argument, a file or standard input; one trailing newline of a file or stdin is dropped."""
    if file is not None:
        if prompt is not None:
            raise UserError("give the prompt either as an argument or with --file, not both")
        if file.is_dir():
            raise UserError(f"--file {file} is a directory: give a text file")
        if not file.is_file():
            raise UserError(f"prompt file not found: {file}")
        data, source = file.read_bytes(), str(file)
    elif prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise UserError("no prompt: pass it as an argument, with --file, or on standard input")
        data, source = sys.stdin.buffer.read(), "standard input"
    else:
        data, source = None, None
    if data is not None:
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(
                f"the prompt in {source} is not UTF-8 text (invalid byte at offset {err.start})",
                hint="convert it first, e.g. `iconv -f latin1 -t utf-8 FILE`",
            ) from None
        prompt = prompt.removesuffix("\n").removesuffix("\r")
    if not prompt:
        raise UserError("the prompt is empty: give the model some text to continue")
    return prompt


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
