"""The `serve` rows of `python -m benchmarks`: `perceiver serve` under 1, 8 and 32 concurrent streaming clients,
batched as requests arrive (the default) against the same server serving one request at a time
(`--max-batch-size 1`: the others wait in its queue).

Both servers run as real processes on 127.0.0.1 (one model thread each, `--threads 1`) with a `clm-small`-shaped
model (random weights: the speed is the same as a trained one's); the clients are threads of this process speaking
plain HTTP. With C clients, each sends its requests one after another (a closed loop), `requests // C` each, every
request `new_tokens` tokens from its own prompt of `prompt_len` bytes (all of one length, so that requests that
arrive together share a batch; `mixed` adds a run with lengths spread over `prompt_len / 2` to `3 prompt_len / 2`,
where each length is a group of its own). Measured: tokens/s over the whole run (completion tokens, from the usage
the server reports, over wall time) and the time to first token of every request (from sending it to the first
streamed text), p50 and p99. The two servers alternate, `repeats` times, after a warm-up.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def sizes(quick: bool) -> dict:
    if quick:
        return {"model": "tiny", "clients": [1, 4], "requests": 4, "new_tokens": 8, "prompt_len": 16, "repeats": 1,
                "mixed": False}
    return {"model": "clm-small", "clients": [1, 8, 32], "requests": 32, "new_tokens": 64, "prompt_len": 64,
            "repeats": 3, "mixed": True}


def serve_rows(row, quick: bool) -> None:
    """Record the rows through `row` (benchmarks.__main__.row)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("  serve: skipped (pip install -e '.[serve]')", flush=True)
        return
    size = sizes(quick)
    with tempfile.TemporaryDirectory(prefix="perceiver-serve-bench-") as tmp:
        checkpoint = write_model(Path(tmp), size["model"])
        servers = {"batched": Server(checkpoint, tmp), "one at a time": Server(checkpoint, tmp, "--max-batch-size",
                                                                                 "1")}
        try:
            for server in servers.values():
                server.wait_ready()
            prompts = [prompt(i, size["prompt_len"]) for i in range(size["requests"])]
            runs = [(c, prompts, "") for c in size["clients"]]
            if size["mixed"]:
                half = size["prompt_len"] // 2
                mixed = [prompt(i, half + (i * 7919) % (2 * half + 1)) for i in range(size["requests"])]
                runs.append((max(size["clients"]), mixed, ", mixed prompt lengths"))
            for server in servers.values():  # warm-up: first passes, thread pools, allocator
                load(server, 2, prompts[:2], size["new_tokens"])
            for clients, texts, label in runs:
                results = {name: [] for name in servers}
                for repeat in range(size["repeats"]):
                    order = list(servers) if repeat % 2 == 0 else list(servers)[::-1]
                    for name in order:
                        results[name].append(load(servers[name], clients, texts, size["new_tokens"]))
                record(row, clients, label, results, size)
        finally:
            for server in servers.values():
                server.stop()


def record(row, clients: int, label: str, results: dict, size: dict) -> None:
    ours, theirs = results["batched"], results["one at a time"]
    rate = lambda runs: statistics.median(r["tokens"] / r["seconds"] for r in runs)  # noqa: E731
    ttft = lambda runs, q: percentile([t for r in runs for t in r["ttft"]], q) * 1000  # noqa: E731
    what = f"{clients} streaming client{'s' if clients > 1 else ''}{label}"
    extra = {"clients": clients, "requests": size["requests"], "new_tokens": size["new_tokens"],
             "runs": {"batched": ours, "one at a time": theirs}}
    row(f"serve, {what} (tok/s)", rate(ours), rate(theirs), "tok/s", "batched vs one request at a time",
        extra=extra)
    for q in (50, 99):
        row(f"serve, {what}: time to first token p{q} (ms)", ttft(ours, q), ttft(theirs, q), "ms",
            "batched vs one at a time", higher_is_better=False)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def prompt(i: int, length: int) -> str:
    text = f"Request {i}: The function returns the number of bytes in the buffer. "
    return (text * (length // len(text) + 1))[:length]


def write_model(root: Path, which: str) -> Path:
    from perceiver_cli.checkpoints import write_checkpoint
    from perceiver_cli.models.clm import CausalLanguageModel, CausalLanguageModelConfig

    if which == "clm-small":
        from perceiver_cli.config import load_run_config

        config = load_run_config("clm-small")[0].backend_config(262)
    else:
        config = CausalLanguageModelConfig(vocab_size=262, max_seq_len=64, max_latents=16, num_channels=32,
                                           num_heads=4, num_self_attention_layers=1, cross_attention_dropout=0.0)
    torch.manual_seed(0)
    return write_checkpoint(root / "model.ckpt", "clm", CausalLanguageModel(config).eval(), config)


class Server:
    """`perceiver serve` on a free port of 127.0.0.1, in its own process."""

    def __init__(self, checkpoint: Path, tmp: str, *args: str):
        self.log = Path(tmp) / f"serve-{len(args)}.err"
        with open(self.log, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "perceiver_cli", "serve", "--model", str(checkpoint), "--name", "bench",
                 "--port", "0", "--threads", "1", "--max-tokens-limit", "4096", *args],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, env=os.environ | {"PERCEIVER_DEBUG": "0"},
            )
        self.port = None

    def wait_ready(self, deadline_s: float = 120) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"perceiver serve exited: {self.log.read_text()}")
            found = re.search(r"on http://127\.0\.0\.1:(\d+)", self.log.read_text())
            if found:
                self.port = int(found.group(1))
                return
            time.sleep(0.1)
        raise RuntimeError(f"perceiver serve did not start within {deadline_s} s: {self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def load(server: Server, clients: int, prompts: list[str], new_tokens: int) -> dict:
    """`clients` threads, each streaming its share of `prompts` one request after another."""
    per_client = max(1, len(prompts) // clients)
    ttft, tokens, errors = [], [0], []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def run(c: int) -> None:
        barrier.wait()
        for i in range(c * per_client, (c + 1) * per_client):
            try:
                first, used = stream(server.port, prompts[i % len(prompts)], new_tokens, seed=i)
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)
                return
            with lock:
                ttft.append(first)
                tokens[0] += used

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]}")
    return {"seconds": seconds, "tokens": tokens[0], "ttft": ttft}


def stream(port: int, text: str, new_tokens: int, seed: int) -> tuple[float, int]:
    """(seconds to the first streamed text, completion tokens) of one streamed request."""
    body = json.dumps({"model": "bench", "prompt": text, "max_tokens": new_tokens, "seed": seed,
                       "temperature": 0.8, "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    first, used = None, None
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        while True:
            line = response.readline()
            if not line or line.strip() == b"data: [DONE]":
                break
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                if event.get("choices") and event["choices"][0]["text"] and first is None:
                    first = time.perf_counter() - start
                if event.get("usage"):
                    used = event["usage"]["completion_tokens"]
    finally:
        conn.close()
    if used is None:
        raise RuntimeError("the stream ended without its usage")
    return (time.perf_counter() - start if first is None else first), used
