"""`perceiver serve`: serve a model over HTTP with OpenAI's completions API (causal LMs) or a fill-mask route (masked
LMs). The options are checked and the model loaded here; the server itself is `perceiver_cli.serving`."""

import ipaddress
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from perceiver_cli.errors import UserError

API_KEY_VARIABLE = "PERCEIVER_API_KEY"
INSTALL_HINT = "pip install -e '.[serve]' (or pip install 'perceiver-cli[serve]')"


def serve(
    model: Annotated[
        str | None,
        typer.Option(help="Run directory, checkpoint file or exported model (default: the most recent run)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port, printed at start).")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar=API_KEY_VARIABLE, show_envvar=True, show_default=False,
            help="Require 'Authorization: Bearer KEY' on every route but /health.",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="The model's id in the API (default: NAME/version_N of a run, else the file's name)."),
    ] = None,
    schedule: Annotated[str, typer.Option(help="Generation window schedule: chunked or sliding.")] = "chunked",
    max_batch_size: Annotated[
        int, typer.Option(help="Sequences generated at once; more requests wait for a free slot.")
    ] = 64,
    max_waiting: Annotated[int, typer.Option(help="Requests that may wait for a slot; more get 503.")] = 256,
    max_tokens_limit: Annotated[int, typer.Option(help="The largest max_tokens a request may ask for.")] = 2048,
    max_body_bytes: Annotated[int, typer.Option(help="The largest request body, in bytes (more: 413).")] = 1 << 20,
    queue_timeout: Annotated[
        float, typer.Option(help="Seconds a request may wait for a slot before a 503.")
    ] = 60.0,
    shutdown_timeout: Annotated[
        float,
        typer.Option(help="On SIGTERM or Ctrl-C: seconds the running requests get to finish before they are ended."),
    ] = 5.0,
    threads: Annotated[
        int,
        typer.Option(help="Threads of the model's operations. One is fastest for the small batches of a step on a "
                     "shared machine; more can pay on idle cores with large models."),
    ] = 1,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request to stderr.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")] = "cpu",
) -> None:
    """Serve a model over HTTP: OpenAI's /v1/completions (causal LMs) or /v1/fill-mask (masked LMs)."""
    _check_options(port, schedule, max_batch_size, max_waiting, max_tokens_limit, max_body_bytes, queue_timeout,
                   shutdown_timeout, api_key)
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError(f"perceiver serve needs the serve extra (FastAPI, uvicorn): {INSTALL_HINT}") from None

    import torch

    from perceiver_cli.checkpoints import load_model
    from perceiver_cli.commands.fill_mask import encode_with_masks, predict_masks
    from perceiver_cli.data.tokenizer import load_tokenizer
    from perceiver_cli.model_choice import resolve_device
    from perceiver_cli.runs import latest_run
    from perceiver_cli.serving.app import create_app
    from perceiver_cli.serving.engine import Engine
    from perceiver_cli.serving.server import serve as run_server

    torch.set_num_threads(threads)  # before the model thread starts: its operations use this many

    source = Path(model) if model is not None else latest_run(None)
    if model is None:
        print(f"using {source} (most recent run)", file=sys.stderr)
    loaded = load_model(source, None, device=resolve_device(device))
    tokenizer = load_tokenizer(loaded.tokenizer, padding_side="left" if loaded.task == "clm" else "right")
    if not _is_loopback(host) and api_key is None:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use the model",
              file=sys.stderr)
    engine = Engine(
        loaded,
        tokenizer,
        model_id=name or model_id(source),
        schedule=schedule,
        max_batch_rows=max_batch_size,
        max_waiting=max_waiting,
        queue_timeout=queue_timeout,
        shutdown_timeout=shutdown_timeout,
    )
    app = create_app(engine, api_key=api_key, max_body_bytes=max_body_bytes, max_tokens_limit=max_tokens_limit,
                     check_masks=encode_with_masks, predict_masks=predict_masks)
    run_server(engine, app, host, port, access_log=access_log)
    # Stopped cleanly: every stream has ended and the model thread is gone. Exit now, without the interpreter's
    # teardown of torch's and transformers' 1,700 modules, which takes seconds on a busy machine and would hold up
    # a process told to stop.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def model_id(source: Path) -> str:
    """The API's name of a model: NAME/version_N for a run directory or a checkpoint inside one, else the name of
    the file (without suffix) or directory."""
    source = Path(os.path.abspath(source))
    if source.is_file() and source.parent.name == "checkpoints":
        source = source.parent.parent
    if source.is_dir() and (source / "checkpoints").is_dir():
        return f"{source.parent.name}/{source.name}"
    return source.stem if source.is_file() else source.name


def _check_options(port, schedule, max_batch_size, max_waiting, max_tokens_limit, max_body_bytes, queue_timeout,
                   shutdown_timeout, api_key) -> None:
    """Every option out of range: one line, before anything is loaded."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0 to 65535, got {port}")
    if schedule not in ("chunked", "sliding"):
        raise UserError(f"unknown schedule {schedule!r}: use chunked or sliding")
    for option, value in (("--max-batch-size", max_batch_size), ("--max-waiting", max_waiting),
                          ("--max-tokens-limit", max_tokens_limit), ("--max-body-bytes", max_body_bytes)):
        if value < 1:
            raise UserError(f"{option} must be at least 1, got {value}")
    for option, value in (("--queue-timeout", queue_timeout), ("--shutdown-timeout", shutdown_timeout)):
        if not value > 0:
            raise UserError(f"{option} must be more than 0 seconds, got {value}")
    if api_key is not None and not api_key.strip():
        raise UserError(f"--api-key (or {API_KEY_VARIABLE}) is empty: give a key, or leave it out")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
