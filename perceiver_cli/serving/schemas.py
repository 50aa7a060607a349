"""Request bodies and response shapes of the server: OpenAI's completions API, Hugging Face's fill-mask pipeline,
and OpenAI's error body.

Requests are validated by pydantic; every mistake becomes a 400 with OpenAI's error body
(`{"error": {"message", "type", "param", "code"}}`), `param` naming the field. Fields of OpenAI's completions request
that this server cannot honour (`logprobs`, `suffix`, penalties, `logit_bias`, `best_of` other than `n`) are refused
rather than ignored; `top_k`, `repetition_penalty` and `ignore_eos` are accepted as extensions (as vLLM accepts them: the openai
client sends them with `extra_body`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 4  # as OpenAI's API

# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
               503: "server_error", 504: "server_error"}


class APIError(Exception):
    """A request that gets an error answer: HTTP status, message, and OpenAI's `param` and `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(err: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field."""
    first = err.errors(include_url=False)[0]
    location = [str(part) for part in first["loc"] if not str(part).startswith(("function-", "union["))]
    # pydantic names the union member a value failed against ("str", "list[int]"): not a field.
    location = [part for part in location if part not in ("str", "list[str]", "list[int]", "list[list[int]]")]
    param = ".".join(location) or None
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param=param)


# ---------------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """`POST /v1/completions`: OpenAI's fields, with OpenAI's defaults (null means the default)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0, le=2)  # 0: greedy (`perceiver generate --greedy`)
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: int | None = Field(1, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    echo: bool | None = False
    user: str | None = None  # accepted, unused
    # Refused unless they ask for nothing.
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    # Extensions (vLLM's names): `perceiver generate --top-k`, `--repetition-penalty` and `--ignore-eos`.
    top_k: int | None = Field(0, ge=0)
    repetition_penalty: float | None = Field(1.0, gt=0)
    ignore_eos: bool | None = False

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> list[str]:
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if not all(stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def check_supported(self) -> None:
        """Refuse what this server cannot do (400) instead of answering as if it had."""
        unsupported = {
            "logprobs": self.logprobs is not None,
            "suffix": self.suffix is not None,
            "frequency_penalty": bool(self.frequency_penalty),
            "presence_penalty": bool(self.presence_penalty),
            "logit_bias": bool(self.logit_bias),
            "best_of": self.best_of is not None and self.best_of != self.num_choices,
        }
        for name, asked in unsupported.items():
            if asked:
                hint = " (use repetition_penalty)" if name.endswith("_penalty") else ""
                raise APIError(400, f"{name} is not supported by this server{hint}", param=name)
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n

    def prompts(self) -> list[str | list[int]]:
        """The prompts: each a text or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [prompt]
        return list(prompt)


class FillMaskParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(5, ge=1, le=1000)


class FillMaskRequest(BaseModel):
    """`POST /v1/fill-mask`: the Hugging Face Inference API's fill-mask body, `{"inputs": "... [MASK] ...",
    "parameters": {"top_k": 5}}`; `model` is optional (the one served)."""

    model_config = ConfigDict(extra="forbid")

    inputs: str | list[str]
    parameters: FillMaskParameters = FillMaskParameters()
    model: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------------------

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion_chunk(request_id: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None) -> dict[str, Any]:
    """One streamed event of one choice."""
    choice = {"text": text, "index": index, "logprobs": None,
              "finish_reason": None if finish_reason is None else FINISH_REASONS[finish_reason]}
    return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def completion(request_id: str, created: int, model: str, texts: list[str], finish_reasons: list[str],
               usage: dict[str, int]) -> dict[str, Any]:
    choices = [
        {"text": text, "index": i, "logprobs": None, "finish_reason": FINISH_REASONS[reason]}
        for i, (text, reason) in enumerate(zip(texts, finish_reasons, strict=True))
    ]
    return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(model_id: str, created: int, task: str, max_seq_len: int) -> dict[str, Any]:
    """An entry of `GET /v1/models`: OpenAI's fields, then ours."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "perceiver", "task": task,
            "max_seq_len": max_seq_len}


def now() -> int:
    return int(time.time())
