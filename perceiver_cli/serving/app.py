"""The HTTP routes: OpenAI's completions and models, a fill-mask route in the Hugging Face pipeline's shape, and
health.

    GET  /health              200 {"status": "ok", ...}; 503 while shutting down. Never needs the API key.
    GET  /v1/models           the served model, in OpenAI's list shape
    POST /v1/completions      causal LMs: OpenAI's completions, streamed as server-sent events with "stream": true
    POST /v1/fill-mask        masked LMs: {"inputs": "text [MASK]", "parameters": {"top_k": 5}}

Every error has OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request, 401
without the API key, 404/405 for unknown routes, 413 for a body over the limit, 503 when overloaded or shutting
down. Bodies are read whole (up to `max_body_bytes`) and parsed as JSON whatever their content type, so `curl -d`
works without a header.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from perceiver_cli.errors import UserError
from perceiver_cli.serving import schemas
from perceiver_cli.serving.engine import Engine, Event, RequestHandle
from perceiver_cli.serving.schemas import APIError

PUBLIC_PATHS = {"/health"}


def create_app(engine: Engine, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               max_tokens_limit: int = 2048, check_masks: Callable | None = None,
               predict_masks: Callable | None = None):
    """The ASGI application: the routes behind the API key and body-size guard. A masked LM's route needs
    `check_masks(tokenizer, text, max_seq_len)` (a UserError for a text without a mask or too long) and
    `predict_masks(model, tokenizer, text, top_k)` (the pipeline's candidates): `perceiver fill-mask`'s own."""
    app = FastAPI(title="perceiver serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        message = {404: "no such route", 405: "method not allowed"}.get(err.status_code, str(err.detail))
        return error_response(APIError(err.status_code, message))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, err: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(err).__name__}"))

    @app.get("/health")
    async def health() -> JSONResponse:
        status = "ok" if engine.failed is None and not engine.draining else (
            "shutting down" if engine.failed is None else "failed")
        body = {"status": status, "model": engine.model_id, "task": engine.task,
                "running": engine.num_running, "running_rows": engine.running_rows,
                "running_groups": engine.running_groups, "waiting": engine.num_waiting,
                "generated_tokens": engine.generated_tokens, "served_requests": engine.served_requests}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_card(engine)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != engine.model_id:
            raise APIError(404, f"the model {model_id!r} does not exist: this server serves {engine.model_id!r}",
                           param="model", code="model_not_found")
        return _card(engine)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse(schemas.CompletionRequest, await request.body())
        body.check_supported()
        check_model(engine, body.model)
        if engine.task != "clm":
            raise APIError(400, f"{engine.model_id!r} is a masked language model: use POST /v1/fill-mask",
                           param="model")
        prompts, settings = generation_request(engine, body, max_tokens_limit)
        handle = engine.submit_generation(prompts, settings)
        try:
            first = await wait_for_events(handle, request, engine.queue_timeout + engine.stall_timeout)
        except BaseException:
            handle.cancel()
            raise
        if first is None:  # the client went away while waiting
            handle.cancel()
            return Response(status_code=499)
        created, request_id = schemas.now(), schemas.completion_id()
        if first[0].kind == "error":
            raise first[0].error
        echo = [_prompt_text(engine, p) for p in prompts for _ in range(body.num_choices)] if body.echo else None
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            stream = sse_stream(engine, handle, first, request_id, created, echo, include_usage,
                                sum(len(p) for p in prompts))
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            texts, reasons, tokens = await collect(engine, handle, first, request)
        finally:
            handle.cancel()  # a no-op once finished; frees the rows if the client went away
        if texts is None:
            return Response(status_code=499)
        if echo:
            texts = [prefix + text for prefix, text in zip(echo, texts)]
        usage = schemas.usage(sum(len(p) for p in prompts), tokens)
        return JSONResponse(schemas.completion(request_id, created, engine.model_id, texts, reasons, usage))

    @app.post("/v1/fill-mask")
    async def fill_mask(request: Request) -> Any:
        body = parse(schemas.FillMaskRequest, await request.body())
        if body.model is not None:
            check_model(engine, body.model)
        if engine.task != "mlm":
            raise APIError(400, f"{engine.model_id!r} is a causal language model: use POST /v1/completions",
                           param="model")
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        if not texts:
            raise APIError(400, "inputs: give at least one text", param="inputs")
        for text in texts:  # a text without a mask or too long: 400 before the model is asked
            try:
                check_masks(engine.tokenizer, text, engine.max_seq_len)
            except UserError as err:
                raise APIError(400, err.message, param="inputs") from None
        top_k = body.parameters.top_k
        results = []
        for text in texts:
            candidates = await engine.run_job(lambda t=text: predict_masks(engine.model, engine.tokenizer, t, top_k))
            results.append(candidates[0] if len(candidates) == 1 else candidates)
        return results[0] if isinstance(body.inputs, str) else results

    return Guard(app, api_key, max_body_bytes)


def error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _card(engine: Engine) -> dict[str, Any]:
    return schemas.model_card(engine.model_id, engine.created, engine.task, engine.max_seq_len)


# ---------------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------------


def parse(model_class, raw: bytes):
    """The body as `model_class`, or a 400 saying what is wrong with it."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        return model_class.model_validate(data)
    except ValidationError as err:
        raise schemas.validation_error(err) from None


def check_model(engine: Engine, model: str) -> None:
    if model != engine.model_id:
        raise APIError(400, f"the model {model!r} does not exist: this server serves {engine.model_id!r} (GET "
                       "/v1/models)", param="model", code="model_not_found")


def generation_request(engine: Engine, body: schemas.CompletionRequest, max_tokens_limit: int):
    """The prompts as token ids and the `GenerationSettings` of a completions request, or a 400."""
    from perceiver_cli.data.tokenizer import encode_text
    from perceiver_cli.generation import GenerationSettings

    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens > max_tokens_limit:
        raise APIError(400, f"max_tokens is {max_tokens}, more than this server allows ({max_tokens_limit})",
                       param="max_tokens")
    prompts = []
    for prompt in body.prompts():
        ids = encode_text(engine.tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty: give the model some text to continue", param="prompt")
        if len(ids) > engine.max_seq_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than the model's context of "
                           f"{engine.max_seq_len}", param="prompt", code="context_length_exceeded")
        if not all(0 <= i < engine.vocab_size for i in ids):
            raise APIError(400, f"prompt token ids must be 0 to {engine.vocab_size - 1}", param="prompt")
        prompts.append(ids)
    n = body.num_choices
    if len(prompts) * n > engine.max_batch_rows:
        raise APIError(400, f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} sequences, more than this "
                       f"server runs at once ({engine.max_batch_rows})", param="n")
    temperature = 1.0 if body.temperature is None else body.temperature
    settings = GenerationSettings(
        max_new_tokens=max_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=body.top_k or 0,
        top_p=1.0 if body.top_p is None else body.top_p,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        num_return_sequences=n,
        seed=body.seed,
        stop=tuple(body.stop or ()),
        stop_at_eos=not body.ignore_eos,
        schedule=engine.schedule,
    )
    try:
        settings.validate(engine.loaded.config.max_latents)
    except UserError as err:
        raise APIError(400, err.message.replace("num-return-sequences", "n")) from None
    return prompts, settings


def _prompt_text(engine: Engine, prompt_ids: list[int]) -> str:
    return engine.tokenizer.decode(prompt_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------------------------
# Waiting for the model thread
# ---------------------------------------------------------------------------------------------------------------


async def wait_for_events(handle: RequestHandle, request: Request, timeout: float) -> list[Event] | None:
    """The request's next events, or None if its client disconnected first (then nobody needs them)."""
    disconnected = asyncio.ensure_future(_disconnect(request))
    events = asyncio.ensure_future(handle.next_events(timeout))
    try:
        await asyncio.wait({disconnected, events}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
        if not events.done():
            events.cancel()
    if events.done() and not events.cancelled():
        return events.result()  # raises the timeout's APIError
    return None


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(engine: Engine, handle: RequestHandle, events: list[Event], request: Request):
    """Every choice's text and finish reason, and the tokens generated; (None, None, 0) if the client went away."""
    texts = [""] * handle.num_choices
    reasons: list[str | None] = [None] * handle.num_choices
    tokens = 0
    while True:
        for event in events:
            if event.kind == "error":
                raise event.error
            if event.kind == "text":
                texts[event.index] += event.text
            elif event.kind == "finish":
                reasons[event.index] = event.finish_reason
                tokens += event.num_tokens
        if all(reason is not None for reason in reasons):
            return texts, reasons, tokens
        events = await wait_for_events(handle, request, engine.stall_timeout)
        if events is None:
            return None, None, 0


async def sse_stream(engine: Engine, handle: RequestHandle, events: list[Event], request_id: str, created: int,
                     echo: list[str] | None, include_usage: bool, prompt_tokens: int) -> AsyncIterator[bytes]:
    """OpenAI's stream: a `text_completion` chunk per choice and step, each choice's last with its finish reason,
    with `include_usage` a last chunk with the usage and no choices, then `data: [DONE]`. An error after the
    stream began is an `{"error": ...}` event (the openai client raises it), then `[DONE]`."""
    model = engine.model_id
    finished = [False] * handle.num_choices
    tokens = 0
    try:
        if echo:
            for index, text in enumerate(echo):
                yield _sse(schemas.completion_chunk(request_id, created, model, index, text, None))
        while True:
            chunks: dict[int, list] = {}  # choice -> [text, finish reason], in order of arrival
            for event in events:
                if event.kind == "error":
                    raise event.error
                chunk = chunks.setdefault(event.index, ["", None])
                if event.kind == "text":
                    chunk[0] += event.text
                else:
                    chunk[1] = event.finish_reason
                    finished[event.index] = True
                    tokens += event.num_tokens
            for index, (text, reason) in chunks.items():
                yield _sse(schemas.completion_chunk(request_id, created, model, index, text, reason))
            if all(finished):
                break
            events = await handle.next_events(engine.stall_timeout)
        if include_usage:
            yield _sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                        "choices": [], "usage": schemas.usage(prompt_tokens, tokens)})
    except APIError as err:
        yield _sse(err.body())
    finally:
        handle.cancel()  # a no-op once finished; when the client went away, its rows leave the batch
    yield b"data: [DONE]\n\n"


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


# ---------------------------------------------------------------------------------------------------------------
# The guard: API key and body size, before any route
# ---------------------------------------------------------------------------------------------------------------


class Guard:
    """ASGI middleware: with an API key, every route but /health answers 401 without `Authorization: Bearer KEY`;
    a body over `max_body_bytes` answers 413. The body is read here, whole, and handed on."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] not in PUBLIC_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = ("missing API key: send the header 'Authorization: Bearer KEY'" if not given
                           else "incorrect API key")
                return await error_response(APIError(401, message, code="invalid_api_key"))(scope, receive, send)
        too_large = APIError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                             code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await error_response(too_large)(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await error_response(too_large)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
