"""`perceiver eval`: measure a trained model on a text split (see perceiver_cli/evaluation.py for the metrics).

The data is the run's own (the [data] section of the preset it was trained with, and the trainer seed, so a split
made from the training data is the same split again), else the embedded corpus. Options override it: --source,
--path or --name describe a different source (--path alone means source "files", --name alone "hub");
--config-name and --text-column change one setting of whichever source is used.

--path on the command line scores all of the text there, whole: every document of every file, whatever its size or
the files' names (no split, so --split does not apply; the result's split is "all"), to score any text.

Causal LMs: --context N scores every token with at most N tokens of context (windows of N tokens, a quarter of them
scored each), and --context-curve repeats that for contexts 64, 256, 1024, ... and the model's window: a table, a
list in --json, and a plot (--plot), of how bits per byte fall as the model reads more. --stride K scores K tokens
per window (default: all the latents): a smaller stride gives each token more context, at a pass per K tokens.
"""

import sys
from contextlib import contextmanager
from typing import Annotated

import typer

from perceiver_cli.errors import UserError

SPLITS = ("validation", "train")


def evaluate(
    model: Annotated[
        str | None,
        typer.Option(help="Run directory, checkpoint file or exported model (default: the most recent run)."),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(help="The split to evaluate: validation (default) or train. Not with --path: its text is "
                     "evaluated whole."),
    ] = None,
    source: Annotated[str | None, typer.Option(help="Data source: embedded, files or hub.")] = None,
    path: Annotated[
        str | None, typer.Option(help="files: a file, directory or glob of text files, all of it evaluated.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="hub: a dataset name, e.g. wikitext.")] = None,
    config_name: Annotated[str | None, typer.Option(help="hub: the dataset configuration.")] = None,
    text_column: Annotated[str | None, typer.Option(help="The column that holds the text.")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N documents only (a quick check).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per batch (default: the run's).")] = None,
    words: Annotated[
        int, typer.Option(help="Masked LM: words to fill, each masked alone, for the word accuracy (0: none).")
    ] = 500,
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")] = "cpu",
    tasks: Annotated[
        str | None,
        typer.Option(
            metavar="NAME[,NAME]",
            help="Run lm-evaluation-harness tasks instead (causal LMs; needs the 'eval' extra). --limit: documents "
            "per task.",
        ),
    ] = None,
    include_path: Annotated[
        str | None, typer.Option(help="With --tasks: a directory of task YAML files to add to the harness's.")
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Option(
            help="Causal LM: score the text as generation sees it, token by token under this window schedule "
            "(chunked or sliding; see `perceiver generate --schedule`), and report its speed.",
        ),
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="With --schedule: full passes, no cache.")] = False,
    context: Annotated[
        int | None,
        typer.Option(help="Causal LM: score every token with at most N tokens of context (1 to the model's window).",
                     metavar="N"),
    ] = None,
    context_curve: Annotated[
        bool,
        typer.Option("--context-curve", help="Causal LM: bits per byte at contexts 64, 256, 1024, ... and the "
                     "model's window, as a table and a plot."),
    ] = False,
    plot: Annotated[
        str | None, typer.Option(help="With --context-curve: the PNG file to draw.  [default: context-curve.png]")
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option(help="Causal LM: score the last K positions of each window (1 to the model's latents; default: "
                     "all the latents, or a quarter of --context): more context for each token, a pass per K.",
                     metavar="K"),
    ] = None,
) -> None:
    """Evaluate a model: loss, perplexity and bits per byte (causal LM), or masked-token loss and accuracy; or
    lm-evaluation-harness tasks (--tasks)."""
    import json

    from perceiver_cli.data.sources import load_documents, load_text_splits
    from perceiver_cli.data.tokenizer import load_tokenizer
    from perceiver_cli.model_choice import choose_model, resolve_device

    if tasks is not None:
        _run_harness(model, tasks, include_path, limit, batch_size, json_output, device, source or path or name)
        return
    if include_path is not None:
        raise UserError("--include-path goes with --tasks")
    if schedule is not None:
        from perceiver_cli.models.clm.windows import check_schedule

        check_schedule(schedule, UserError)
    elif no_cache:
        raise UserError("--no-cache goes with --schedule")
    if split is not None and split not in SPLITS:
        raise UserError(f"unknown split {split!r}: use validation or train")
    if split is not None and path is not None:
        raise UserError(f"--split {split} does not go with --path, whose text is evaluated whole: leave out --split")
    plot = _check_context_options(context, context_curve, plot, schedule, stride)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 document, got {limit}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if words < 0:
        raise UserError(f"--words must be 0 (no word accuracy) or more, got {words}")
    loaded = choose_model(model, None, device=resolve_device(device))
    if (context is not None or context_curve or stride is not None) and loaded.task != "clm":
        raise UserError("--context, --context-curve and --stride are for causal LMs: a masked LM reads its whole chunk")
    if context is not None or stride is not None:
        from perceiver_cli.evaluation import context_window

        # In range, before loading data.
        context_window(loaded.model.max_seq_len, loaded.model.max_latents, context, stride)
    run_config = loaded.run_config or {}
    data = data_source(run_config.get("data") or {}, source, path, name, config_name, text_column)
    batch_size = batch_size or (run_config.get("data") or {}).get("batch_size", 8)
    seed = (run_config.get("trainer") or {}).get("seed", 0)

    # --path: the text named on the command line, all of it, whole; else a split of the source.
    split = "all" if path is not None else split or "validation"
    whole = {"all": load_documents(data["source"], path=data["path"], text_column=data["text_column"],
                                   document=data["document"] or "paragraph")} if split == "all" else None
    splits = whole or load_text_splits(
        data["source"],
        path=data["path"],
        name=data["name"],
        config=data["config_name"],
        text_column=data["text_column"],
        validation_fraction=data["validation_fraction"],
        seed=seed,
        document=data["document"] or "paragraph",
    )
    documents = splits[split]
    if limit is not None:
        documents = documents.select(range(min(limit, documents.num_rows)))

    tokenizer = load_tokenizer(loaded.tokenizer, padding_side="left" if loaded.task == "clm" else "right")
    with _progress_bar() as progress:
        metrics = _run(
            loaded, tokenizer, documents, split, batch_size, run_config, seed, progress, schedule, no_cache, words,
            context, context_curve, stride,
        )
    if context_curve:
        _plot_context_curve(metrics["context_curve"], plot, f"{loaded.source} ({split})")
        metrics["plot"] = str(plot)

    result = {
        "task": loaded.task,
        "model": str(loaded.source),
        "split": split,
        "data": {k: v for k, v in data.items() if v is not None and k != "validation_fraction"},
        "documents": documents.num_rows,
        **metrics,
    }
    if json_output:
        print(json.dumps(result, ensure_ascii=False))
    else:
        _print_table(result)


def _check_context_options(
    context: int | None, context_curve: bool, plot: str | None, schedule: str | None, stride: int | None = None
):
    """The --context, --context-curve, --stride and --plot options before any loading; the plot's path (with the
    curve)."""
    from pathlib import Path

    if context is not None and context_curve:
        raise UserError("--context and --context-curve do not go together: the curve scores its own contexts")
    if (context is not None or context_curve) and schedule is not None:
        raise UserError("--context and --context-curve do not go with --schedule, which scores as generation does")
    if context is not None and context < 1:
        raise UserError(f"--context must be at least 1 token, got {context}")
    if stride is not None and context_curve:
        raise UserError("--stride does not go with --context-curve: the curve scores a quarter of each context")
    if stride is not None and schedule is not None:
        raise UserError("--stride does not go with --schedule, which scores every token as generation does")
    if stride is not None and stride < 1:
        raise UserError(f"--stride must be at least 1 token, got {stride}")
    if plot is not None and not context_curve:
        raise UserError("--plot goes with --context-curve")
    if not context_curve:
        return None
    plot_path = Path(plot or "context-curve.png")
    if not plot_path.parent.is_dir():
        raise UserError(f"directory {str(plot_path.parent)!r} of --plot does not exist: create it or pick another")
    return plot_path


def _run_harness(model, tasks, include_path, limit, batch_size, json_output, device, data_option) -> None:
    import json

    from perceiver_cli.harness import run_tasks
    from perceiver_cli.model_choice import choose_model, resolve_device

    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise UserError("--tasks needs at least one task name, e.g. --tasks lambada_openai")
    if data_option:
        raise UserError("--tasks evaluates on the tasks' own data: --source, --path and --name do not apply")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 document, got {limit}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    device = resolve_device(device)
    loaded, results = run_tasks(lambda: choose_model(model, None, device=device), names, include_path, limit,
                                batch_size or 1)
    if json_output:
        print(json.dumps({"model": str(loaded.source), "tasks": results}, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("task", "metric", "value", box=None, pad_edge=False, title=str(loaded.source))
    for task, metrics in results.items():
        for metric, value in metrics.items():
            shown = f"{value:,}" if isinstance(value, int) else f"{value:.4f}"
            table.add_row(task, metric.replace(",none", ""), shown)
    Console(soft_wrap=True).print(table)


def data_source(
    run_data: dict,
    source: str | None,
    path: str | None,
    name: str | None,
    config_name: str | None,
    text_column: str | None,
) -> dict:
    """The data to evaluate on: the run's data section with the command line's overrides (see the module doc)."""
    keys = ("source", "path", "name", "config_name", "text_column", "document")
    data = {"source": "embedded", "path": None, "name": None, "config_name": None, "text_column": "text",
            "document": None}  # document None: "paragraph"
    data |= {k: run_data[k] for k in keys if run_data.get(k) is not None}
    data["validation_fraction"] = run_data.get("validation_fraction", 0.05)
    if source or path or name:
        inferred = "files" if path else "hub" if name else None
        data |= {"source": source or inferred, "path": path, "name": name, "config_name": None, "text_column": "text",
                 "document": None}
    if config_name:
        data["config_name"] = config_name
    if text_column:
        data["text_column"] = text_column
    return data


def _run(
    loaded, tokenizer, documents, split, batch_size, run_config, seed, progress, schedule, no_cache, words,
    context=None, context_curve=False, stride=None,
) -> dict:
    from perceiver_cli.evaluation import (
        clm_token_stream,
        evaluate_clm,
        evaluate_clm_generation,
        evaluate_context_curve,
        evaluate_mlm,
        evaluate_word_fill,
    )

    if schedule is not None and loaded.task != "clm":
        raise UserError("--schedule is for causal LMs: a masked LM does not generate")
    if loaded.task == "clm":
        stream, num_bytes = clm_token_stream(tokenizer, documents["text"])
        if schedule is not None:
            return evaluate_clm_generation(loaded.model, stream, schedule, not no_cache, batch_size, progress)
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if context_curve:
            curve = evaluate_context_curve(loaded.model, stream, num_bytes, batch_size, pad_token_id, progress)
            return {"bytes": num_bytes, "window": loaded.model.max_seq_len, "context_curve": curve}
        return evaluate_clm(loaded.model, stream, num_bytes, batch_size, pad_token_id, progress, context, stride)

    from datasets import DatasetDict

    from perceiver_cli.data.pipeline import tokenize_and_chunk

    data = run_config.get("data") or {}
    chunks = tokenize_and_chunk(
        DatasetDict({split: documents}), tokenizer, task="mlm", max_seq_len=loaded.model.max_seq_len
    )[split]
    result = evaluate_mlm(
        loaded.model,
        tokenizer,
        chunks,
        batch_size,
        mask_prob=data.get("mask_prob", 0.15),
        whole_word_masking=data.get("whole_word_masking", True),
        seed=seed,
        progress=progress,
    )
    if words:
        result |= evaluate_word_fill(loaded.model, tokenizer, chunks, num_words=words, seed=seed, batch_size=batch_size)
    return result


@contextmanager
def _progress_bar():
    """A rich progress bar on stderr while evaluating, when stderr is a terminal; yields a (done, total) callback."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("evaluating", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table("metric", "value", box=None, pad_edge=False, title=f"{result['model']} ({result['split']})")
    for key, value in result.items():
        if key in ("model", "split", "context_curve"):
            continue
        if isinstance(value, float):
            shown = f"{value:.4f}"
        elif isinstance(value, dict):
            shown = ", ".join(f"{k}={v}" for k, v in value.items())
        else:
            shown = f"{value:,}" if isinstance(value, int) else str(value)
        table.add_row(key.replace("_", " "), Text(shown))
    Console(soft_wrap=True).print(table)
    if "context_curve" in result:
        curve = Table("context", "stride", "loss", "bits per byte", "tokens", box=None, pad_edge=False,
                      title="bits per byte by context (tokens)")
        for point in result["context_curve"]:
            curve.add_row(f"{point['context']:,}", f"{point['stride']:,}", f"{point['loss']:.4f}",
                          f"{point['bits_per_byte']:.4f}", f"{point['tokens']:,}")
        Console(soft_wrap=True).print(curve)


def _plot_context_curve(curve: list[dict], path, title: str) -> None:
    """Bits per byte against the context (log2 axis) as a PNG at `path`; matplotlib's Agg canvas, no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    contexts = [point["context"] for point in curve]
    figure = Figure(figsize=(6.4, 4.0), dpi=100, layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(contexts, [point["bits_per_byte"] for point in curve], marker="o")
    axes.set_xscale("log", base=2)
    # A label per context, but none beside the window's when it is close (a window of 1100 after 1024).
    labels = [f"{c:,}" if c == contexts[-1] or contexts[-1] >= 1.5 * c else "" for c in contexts]
    axes.set_xticks(contexts, labels)
    axes.xaxis.set_minor_locator(NullLocator())
    axes.ticklabel_format(axis="y", useOffset=False)
    axes.set_xlabel("context (tokens)")
    axes.set_ylabel("bits per byte")
    axes.set_title(title, fontsize="medium")
    axes.grid(True, alpha=0.3)
    try:
        figure.savefig(path, format="png")
    except OSError as e:
        raise UserError(f"could not write the plot {str(path)!r} ({e.strerror or e}): pick another --plot") from e
