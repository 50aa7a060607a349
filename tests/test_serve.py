"""`perceiver serve` against real clients: the server runs as its own process on 127.0.0.1 (started as a user starts
it, on a free port it prints), and is called with the official `openai` package and with plain HTTP. Answers equal
`perceiver generate`'s with the same seed and settings; bad requests get 400 in OpenAI's error shape and the server
goes on; a client that goes away frees its rows; SIGTERM ends the streams cleanly and exits; a bounded load test
keeps memory flat."""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import torch

from perceiver_cli.checkpoints import write_checkpoint
from perceiver_cli.models.clm import CausalLanguageModel
from perceiver_cli.models.mlm import MaskedLanguageModel
from tiny_models import tiny_clm_config, tiny_mlm_config
from cli_runner import assert_one_error, run_cli, write_run

KEY = "test-key"
MODEL = "tiny-clm/version_0"  # the id `perceiver serve` gives runs/tiny-clm/version_0


# ---------------------------------------------------------------------------------------------------------------
# The server process
# ---------------------------------------------------------------------------------------------------------------


class ServerProcess:
    """`perceiver serve --port 0 ARGS` in a process of its own, stderr to a file; `url` once it answers /health."""

    def __init__(self, cwd: Path, *args: str, env: dict | None = None):
        self.log = cwd / f"serve-{time.monotonic_ns()}.err"
        self.stderr = open(self.log, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "perceiver_cli", "serve", "--port", "0", *args],
            cwd=cwd, stdout=subprocess.DEVNULL, stderr=self.stderr,
            env={**os.environ, "PERCEIVER_DEBUG": "0", **(env or {})},
        )
        self.url = self.host = None

    def wait_ready(self, deadline_s: float = 60) -> "ServerProcess":
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.stderr_text()}")
            found = re.search(r"on http://([\d.]+):(\d+)", self.stderr_text())
            if found:
                self.host, self.port = found.group(1), int(found.group(2))
                self.url = f"http://{self.host}:{self.port}"
                status, _ = request(self, "GET", "/health", key=None)
                if status == 200:
                    return self
            time.sleep(0.1)
        pytest.fail(f"the server did not answer /health within {deadline_s} s:\n{self.stderr_text()}")

    def stderr_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024

    def health(self) -> dict:
        return request(self, "GET", "/health", key=None)[1]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.stderr.close()


def request(server, method: str, path: str, body=None, key: str | None = KEY, timeout: float = 30):
    """(status, parsed JSON body) of one plain HTTP request; `body` a dict (sent as JSON) or raw bytes."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(method, path, data, headers)
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def stream(server, body: dict, key: str = KEY, on_event=None) -> list:
    """The events of a streamed completion over plain HTTP, up to and including the string "[DONE]"."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body | {"stream": True}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = []
    try:
        while True:
            line = response.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                data = line[6:].strip().decode()
                events.append(data if data == "[DONE]" else json.loads(data))
                if on_event is not None:
                    on_event(events[-1])
                if data == "[DONE]":
                    break
    finally:
        conn.close()
    return events


def streamed_texts(events: list, n: int = 1) -> tuple[list[str], list[str]]:
    texts, reasons = [""] * n, [None] * n
    for event in events:
        if isinstance(event, dict) and event.get("choices"):
            choice = event["choices"][0]
            texts[choice["index"]] += choice["text"]
            reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
    return texts, reasons


def client(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """`perceiver generate` runs in this process for the expected answers, one thread as the server's model runs:
    on a busy 2-core machine, two threads make a token of the tiny model 20 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny causal LM as a run directory and a tiny masked LM as a checkpoint file."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    config = tiny_clm_config(cross_attention_dropout=0.0, init_scale=0.2)  # spread logits: clear greedy choices
    write_run(root, "tiny-clm", "clm", CausalLanguageModel(config).eval(), config)
    torch.manual_seed(0)
    config = tiny_mlm_config(max_seq_len=64)
    config.encoder.init_scale = config.decoder.init_scale = 0.2
    write_checkpoint(root / "mlm.ckpt", "mlm", MaskedLanguageModel(config).eval(), config)
    return root


@pytest.fixture(scope="module")
def server(workdir):
    """The causal LM behind an API key given by the environment variable, on the default host."""
    process = ServerProcess(workdir, "--model", "runs/tiny-clm/version_0", "--max-tokens-limit", "4000",
                            env={"PERCEIVER_API_KEY": KEY})
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def mlm_server(workdir):
    process = ServerProcess(workdir, "--model", "mlm.ckpt", "--name", "tiny-mlm")
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def generate_cli(capsys, workdir, prompt: str, *options: str) -> list[dict]:
    """`perceiver generate --json` on the same model: one record per sequence."""
    status, out, err = run_cli(capsys, "generate", "--model", str(workdir / "runs/tiny-clm/version_0"), "--json",
                               *options, prompt)
    assert status == 0, err
    return [json.loads(line) for line in out.splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# Answers: the openai client and plain HTTP, equal to `perceiver generate`
# ---------------------------------------------------------------------------------------------------------------


def test_binds_loopback_by_default_and_lists_the_model(server):
    assert server.host == "127.0.0.1"
    [model] = client(server).models.list().data
    assert model.id == MODEL and model.owned_by == "perceiver"
    assert server.health()["status"] == "ok"


@pytest.mark.parametrize(
    "api, cli",
    [
        (dict(temperature=0.8, top_p=0.9, seed=3), ["--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]),
        (dict(temperature=0), ["--greedy"]),
        (dict(n=3, seed=7, extra_body={"top_k": 20, "repetition_penalty": 1.3, "ignore_eos": True}),
         ["--num-return-sequences", "3", "--seed", "7", "--top-k", "20", "--repetition-penalty", "1.3",
          "--ignore-eos"]),
    ],
    ids=["sampling", "greedy", "n-top-k-penalty"],
)
def test_openai_client_completions_equal_perceiver_generate(server, workdir, capsys, api, cli):
    prompt = "The function returns"
    expected = generate_cli(capsys, workdir, prompt, "--max-new-tokens", "24", *cli)
    answer = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=24, **api)
    assert [c.text for c in answer.choices] == [r["text"] for r in expected]
    assert [c.index for c in answer.choices] == list(range(len(expected)))
    assert all(c.finish_reason == "length" for c in answer.choices)
    assert answer.usage.prompt_tokens == len(prompt.encode())
    assert answer.usage.completion_tokens == sum(r["generated_tokens"] for r in expected)

    chunks = list(client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=24, stream=True,
                                                     stream_options={"include_usage": True}, **api))
    texts = [""] * len(expected)
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        texts[choice.index] += choice.text
    assert texts == [r["text"] for r in expected]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_stop_strings_and_prompt_lists_as_perceiver_generate(server, workdir, capsys):
    free = generate_cli(capsys, workdir, "Hello", "--seed", "5", "--max-new-tokens", "30")[0]["text"]
    stop = free[10:12]  # a string the sampled text reaches
    [expected] = generate_cli(capsys, workdir, "Hello", "--seed", "5", "--max-new-tokens", "30", "--stop", stop)
    assert expected["finish_reason"] == "stop"
    answer = client(server).completions.create(model=MODEL, prompt="Hello", max_tokens=30, seed=5, stop=[stop])
    assert answer.choices[0].text == expected["text"] and answer.choices[0].finish_reason == "stop"

    answer = client(server).completions.create(model=MODEL, prompt="Hello", max_tokens=30, seed=5, echo=True)
    assert answer.choices[0].text == "Hello" + free

    # Each prompt of a list is answered as `perceiver generate` answers it alone, with the request's seed.
    prompts = ["a", "The cat", "Hello"]
    answer = client(server).completions.create(model=MODEL, prompt=prompts, max_tokens=12, seed=2)
    for choice, prompt in zip(answer.choices, prompts, strict=True):
        assert choice.text == generate_cli(capsys, workdir, prompt, "--seed", "2", "--max-new-tokens", "12")[0]["text"]


def test_plain_http_stream_is_server_sent_events_ending_in_done(server, workdir, capsys):
    events = stream(server, {"model": MODEL, "prompt": "Hello", "max_tokens": 10, "seed": 1})
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        assert event["object"] == "text_completion" and event["model"] == MODEL and len(event["choices"]) == 1
    texts, reasons = streamed_texts(events)
    assert texts[0] == generate_cli(capsys, workdir, "Hello", "--seed", "1", "--max-new-tokens", "10")[0]["text"]
    assert reasons == ["length"]


def test_concurrent_streams_run_together_and_each_equals_generate(server, workdir, capsys):
    # Prompts of different lengths: each runs as it runs alone, so each equals `perceiver generate` exactly.
    prompts = [("x" * (i + 1), i) for i in range(8)]
    results, spans = {}, {}
    barrier = threading.Barrier(len(prompts))

    def run(prompt, seed):
        barrier.wait()
        start = time.monotonic()
        events = stream(server, {"model": MODEL, "prompt": prompt, "max_tokens": 80, "seed": seed})
        spans[seed] = (start, time.monotonic())
        results[seed] = streamed_texts(events)[0][0]

    threads = [threading.Thread(target=run, args=p) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert max(start for start, _ in spans.values()) < min(end for _, end in spans.values())  # all at once
    for prompt, seed in prompts:
        expected = generate_cli(capsys, workdir, prompt, "--seed", str(seed), "--max-new-tokens", "80")
        assert results[seed] == expected[0]["text"], prompt


def test_a_slow_stream_stalls_nobody_and_a_client_that_leaves_frees_its_rows(server):
    # A client that asks for 4,000 tokens and reads nothing: the server's writes to it block, its generation goes on.
    slow = socket.create_connection((server.host, server.port))
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 4000, "stream": True,
                       "ignore_eos": True}).encode()
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 10
    while server.health()["running"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = server.health()["generated_tokens"]
    # Meanwhile another request comes and goes.
    begin = time.monotonic()
    answer = client(server).completions.create(model=MODEL, prompt="Hi", max_tokens=5, seed=0)
    assert answer.choices[0].finish_reason == "length" and time.monotonic() - begin < 10
    assert server.health()["running"] == 1  # the slow one is still generating
    slow.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while (health := server.health())["running"] or health["running_rows"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.02)
    stopped = health["generated_tokens"]
    time.sleep(0.3)
    assert server.health()["generated_tokens"] == stopped  # nothing runs for nobody
    assert stopped - started < 4000  # it was ended, not finished

    # The same for a request without streaming, whose client gives up waiting for the whole answer.
    impatient = socket.create_connection((server.host, server.port))
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 4000, "ignore_eos": True}).encode()
    impatient.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 10
    while server.health()["running"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    impatient.close()
    while (health := server.health())["running"] or health["running_rows"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.02)
    assert health["generated_tokens"] - stopped < 4000


# ---------------------------------------------------------------------------------------------------------------
# Bad requests, the API key, limits
# ---------------------------------------------------------------------------------------------------------------

TOO_LONG = "x" * 49  # the tiny model's context is 48 tokens


@pytest.mark.parametrize(
    "body, param, code",
    [
        (b'{"model": "tiny-clm/version_0", "prompt": ', None, None),
        (b"[1, 2]", None, None),
        ({"model": "gpt-4", "prompt": "Hi"}, "model", "model_not_found"),
        ({"model": MODEL, "prompt": "Hi", "max_tokens": -1}, "max_tokens", None),
        ({"model": MODEL, "prompt": "Hi", "max_tokens": 10**9}, "max_tokens", None),
        ({"model": MODEL, "prompt": "Hi", "top_p": 1.5}, "top_p", None),
        ({"model": MODEL, "prompt": TOO_LONG}, "prompt", "context_length_exceeded"),
        ({"model": MODEL, "prompt": ""}, "prompt", None),
        ({"model": MODEL, "prompt": "Hi", "n": 1000}, "n", None),
        ({"model": MODEL, "prompt": "Hi", "temperature": -1}, "temperature", None),
        ({"model": MODEL, "prompt": "Hi", "logprobs": 2}, "logprobs", None),
        ({"model": MODEL, "prompt": "Hi", "colour": "blue"}, "colour", None),
        ({"model": MODEL}, "prompt", None),
    ],
    ids=["malformed-json", "not-an-object", "unknown-model", "negative-max-tokens", "huge-max-tokens",
         "top-p-above-1", "prompt-too-long", "empty-prompt", "n-too-large", "negative-temperature",
         "logprobs-unsupported", "unknown-field", "no-prompt"],
)
def test_bad_requests_get_400_in_openai_shape_and_the_server_goes_on(server, body, param, code):
    status, answer = request(server, "POST", "/v1/completions", body)
    assert status == 400, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param and answer["error"]["code"] == code
    assert request(server, "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})[0] == 200


def test_the_openai_client_raises_the_servers_errors(server):
    with pytest.raises(openai.BadRequestError, match="more than this server allows"):
        client(server).completions.create(model=MODEL, prompt="Hi", max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="context of 48"):
        client(server).completions.create(model=MODEL, prompt=TOO_LONG, stream=True)
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").completions.create(model=MODEL, prompt="Hi")


def test_every_route_but_health_needs_the_api_key(server):
    for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/completions", {"model": MODEL}),
                               ("POST", "/v1/fill-mask", {"inputs": "a"}), ("GET", "/no/such/route", None)]:
        for key in (None, "wrong", KEY[:-1]):
            status, answer = request(server, method, path, body, key=key)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key", (path, key, answer)
    assert request(server, "GET", "/health", key=None)[0] == 200
    assert request(server, "GET", "/no/such/route")[0] == 404


def test_request_bodies_are_capped(server):
    body = json.dumps({"model": MODEL, "prompt": "x" * (1 << 20)}).encode()  # over the default 1 MiB
    status, answer = request(server, "POST", "/v1/completions", body)
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    assert request(server, "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})[0] == 200


def test_a_full_server_queues_then_refuses_with_clear_errors(workdir):
    # One sequence at a time, one request may wait, for half a second.
    process = ServerProcess(workdir, "--model", "runs/tiny-clm/version_0", "--max-batch-size", "1", "--max-waiting",
                            "1", "--queue-timeout", "0.5", "--max-tokens-limit", "100000")
    try:
        process.wait_ready()
        busy = socket.create_connection((process.host, process.port))  # holds the only slot, reads nothing
        body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 100000, "stream": True,
                           "ignore_eos": True}).encode()
        busy.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 10
        while process.health()["running"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        waiting = {}
        thread = threading.Thread(target=lambda: waiting.update(answer=request(
            process, "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi"}, key=None)))
        begin = time.monotonic()
        thread.start()
        while process.health()["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, answer = request(process, "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi"}, key=None)
        assert status == 503 and answer["error"]["code"] == "overloaded"
        thread.join(10)
        status, answer = waiting["answer"]
        assert status == 503 and answer["error"]["code"] == "queue_timeout" and "try again" in answer["error"]["message"]
        assert 0.5 <= time.monotonic() - begin < 10
        busy.close()
        deadline = time.monotonic() + 10
        while process.health()["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert request(process, "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi"}, key=None)[0] == 200
    finally:
        process.stop()


# ---------------------------------------------------------------------------------------------------------------
# Masked LMs
# ---------------------------------------------------------------------------------------------------------------


def flat(candidates: list) -> list[dict]:
    """The candidates of one mask (a list of dicts) or of several (a list of such lists), in one list."""
    return [c for row in (candidates if isinstance(candidates[0], list) else [candidates]) for c in row]


def test_fill_mask_answers_in_the_pipelines_shape(mlm_server, workdir):
    from perceiver_cli.checkpoints import load_model
    from perceiver_cli.commands.fill_mask import predict_masks
    from perceiver_cli.data.tokenizer import load_tokenizer

    loaded = load_model(workdir / "mlm.ckpt")
    tokenizer = load_tokenizer("utf8")
    for text in ("ab[MASK]d", "The [MASK][MASK] is"):
        expected = predict_masks(loaded.model, tokenizer, text, 3)
        expected = expected[0] if len(expected) == 1 else expected
        status, answer = request(mlm_server, "POST", "/v1/fill-mask", {"inputs": text, "parameters": {"top_k": 3}})
        assert status == 200
        assert [(c["token"], c["token_str"], c["sequence"]) for c in flat(answer)] == [
            (c["token"], c["token_str"], c["sequence"]) for c in flat(expected)]
        assert [c["score"] for c in flat(answer)] == pytest.approx([c["score"] for c in flat(expected)], abs=1e-6)
    status, answer = request(mlm_server, "POST", "/v1/fill-mask", {"inputs": ["a[MASK]", "b[MASK]"]}, key=None)
    assert status == 200 and len(answer) == 2 and len(answer[0]) == 5  # one result per input, top_k 5

    status, answer = request(mlm_server, "POST", "/v1/fill-mask", {"inputs": "no mask here"}, key=None)
    assert status == 400 and "[MASK]" in answer["error"]["message"]
    status, answer = request(mlm_server, "POST", "/v1/completions", {"model": "tiny-mlm", "prompt": "a"}, key=None)
    assert status == 400 and "/v1/fill-mask" in answer["error"]["message"]
    assert request(mlm_server, "GET", "/v1/models", key=None)[1]["data"][0]["task"] == "mlm"


# ---------------------------------------------------------------------------------------------------------------
# Load, shutdown
# ---------------------------------------------------------------------------------------------------------------


def test_load_64_streaming_clients_all_answered_and_memory_stays_flat(server):
    def round_of(clients: int, tokens: int) -> list:
        results = [None] * clients
        barrier = threading.Barrier(clients)

        def run(i):
            barrier.wait()
            body = {"model": MODEL, "prompt": f"client {i:02d}", "max_tokens": tokens, "seed": i,
                    "stream_options": {"include_usage": True}}
            results[i] = stream(server, body)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return results

    started = time.monotonic()
    round_of(64, 8)  # warm-up: buffers, caches and thread pools reach their working size
    rss = []
    for _ in range(2):
        for events in round_of(64, 8):
            assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 8
            assert streamed_texts(events[:-2])[1] == ["length"]
        rss.append(server.rss_bytes())
    assert time.monotonic() - started < 60
    assert rss[1] <= rss[0] + max(16 << 20, rss[0] // 20), rss  # flat: within 16 MiB or 5%
    assert server.health()["running"] == 0 and server.health()["waiting"] == 0


def test_sigterm_stops_listening_ends_streams_cleanly_and_exits(workdir):
    process = ServerProcess(workdir, "--model", "runs/tiny-clm/version_0", "--shutdown-timeout", "2",
                            "--max-tokens-limit", "100000")
    try:
        process.wait_ready()
        results, first = {}, {"long": threading.Event(), "short": threading.Event()}

        def run(name, tokens):
            body = {"model": MODEL, "prompt": "Hello", "max_tokens": tokens, "ignore_eos": True}  # no early end
            results[name] = stream(process, body, on_event=lambda _: first[name].set())

        threads = [threading.Thread(target=run, args=("long", 100000)), threading.Thread(target=run,
                                                                                         args=("short", 60))]
        for thread in threads:
            thread.start()
        assert first["long"].wait(20) and first["short"].wait(20)
        sent = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5  # new connections are refused within moments
        while True:
            try:
                socket.create_connection((process.host, process.port), timeout=1).close()
            except OSError:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for thread in threads:
            thread.join(20)
        assert process.process.wait(15) == 0
        assert time.monotonic() - sent < 10
        for name, reason in (("short", "length"), ("long", "abort")):  # finished within the grace, or ended
            assert results[name][-1] == "[DONE]"
            assert streamed_texts(results[name])[1] == [reason], name
        assert "Traceback" not in process.stderr_text()
    finally:
        process.stop()


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------


def test_without_the_serve_extra_one_line_says_how_to_install_it(capsys, monkeypatch, workdir):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi raises ImportError
    status, out, err = run_cli(capsys, "serve", "--model", str(workdir / "mlm.ckpt"))
    assert_one_error(status, err, "pip install -e '.[serve]'", out)


@pytest.mark.parametrize(
    "args, fragment",
    [(["--port", "70000"], "--port"), (["--max-batch-size", "0"], "--max-batch-size"),
     (["--schedule", "zigzag"], "schedule"), (["--model", "no/such/run"], "model not found"),
     (["--api-key", " "], "api-key")],
)
def test_bad_options_are_one_line_and_exit_2(capsys, args, fragment):
    status, out, err = run_cli(capsys, "serve", *args)
    assert_one_error(status, err, fragment, out)


def test_a_port_in_use_is_one_line(capsys, workdir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        status, out, err = run_cli(capsys, "serve", "--model", str(workdir / "mlm.ckpt"), "--port",
                                   str(taken.getsockname()[1]))
    assert_one_error(status, err, "choose another with --port", out)
