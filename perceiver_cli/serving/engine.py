"""The model thread: every model call of the server runs here, one at a time, while the HTTP side stays on asyncio.

Causal LMs run a continuous batch (`perceiver_cli.generation.ContinuousBatch`): between two generation steps the
thread admits the requests that arrived (first come, first served, while the batch has rows to spare), drops the
rows of requests whose client went away, samples one token for every running row and hands the text to each
request's asyncio queue (one call into the event loop per step). So a request waits for no other to finish, and a
slow reader stalls nobody: its text queues up on its side. Masked LMs answer fill-mask jobs in arrival order.

Nothing waits forever: a request waits at most `queue_timeout` seconds for a slot (then 503), and the HTTP side gives
up on a thread that sends nothing for `stall_timeout` seconds (504). A failed model call ends the requests it was
running with a 500 and the thread goes on serving. `begin_shutdown` (SIGTERM) stops admissions at once; the running
requests get `shutdown_timeout` seconds to finish, then end with finish_reason "abort".
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from perceiver_cli.errors import UserError, first_line
from perceiver_cli.serving.schemas import APIError

log = logging.getLogger("perceiver.serve")

# ---------------------------------------------------------------------------------------------------------------
# What the HTTP side holds
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Event:
    """What a request learns from one step: text of a choice, the end of a choice, or an error for all of them."""

    kind: str  # "text", "finish" or "error"
    index: int = 0  # the choice: prompt p's sequence i is choice p * n + i, as in OpenAI's API
    text: str = ""
    finish_reason: str | None = None
    num_tokens: int = 0  # with "finish": the tokens the choice generated
    error: APIError | None = None


class RequestHandle:
    """One request as both sides see it: the HTTP side reads `events` (lists of `Event`s, one list per step) and
    calls `cancel()` when its client is gone; the model thread reads `cancelled` between steps."""

    def __init__(self, loop: asyncio.AbstractEventLoop, num_choices: int):
        self.loop = loop
        self.events: asyncio.Queue[list[Event]] = asyncio.Queue()
        self.num_choices = num_choices
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    async def next_events(self, timeout: float) -> list[Event]:
        """The next events, and any that came with them; a 504 after `timeout` seconds without any."""
        try:
            events = await asyncio.wait_for(self.events.get(), timeout)
        except TimeoutError:
            raise APIError(504, f"the model produced nothing for {timeout:.0f} s: try again later") from None
        while not self.events.empty():
            events = events + self.events.get_nowait()
        return events


@dataclass
class _Pending:
    """A request waiting for the model thread: prompts to generate from, or a job (fill-mask) to run."""

    handle: RequestHandle
    enqueued: float
    prompts: list[list[int]] = field(default_factory=list)
    settings: Any = None  # GenerationSettings
    job: Callable[[], Any] | None = None
    future: asyncio.Future | None = None

    @property
    def num_rows(self) -> int:
        return len(self.prompts) * self.settings.num_return_sequences if self.job is None else 0


@dataclass
class _Running:
    """A request in the batch: its members (one per prompt) and how many of them are still running."""

    handle: RequestHandle
    members: list = field(default_factory=list)
    remaining: int = 0


# ---------------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------------


class Engine:
    """The loaded model, its tokenizer and the one thread that runs it."""

    def __init__(
        self,
        loaded,
        tokenizer,
        model_id: str,
        schedule: str = "chunked",
        max_batch_rows: int = 64,
        max_waiting: int = 256,
        queue_timeout: float = 60.0,
        stall_timeout: float = 60.0,
        shutdown_timeout: float = 5.0,
    ):
        self.loaded = loaded
        self.task = loaded.task
        self.model = loaded.model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_seq_len = loaded.config.max_seq_len if self.task == "clm" else loaded.model.max_seq_len
        self.vocab_size = loaded.config.vocab_size if self.task == "clm" else len(tokenizer)
        self.schedule = schedule
        self.max_batch_rows = max_batch_rows
        self.max_waiting = max_waiting
        self.queue_timeout = queue_timeout
        self.stall_timeout = stall_timeout
        self.shutdown_timeout = shutdown_timeout
        self.created = int(time.time())

        self._inbox: queue.Queue[_Pending] = queue.Queue()
        self._waiting: collections.deque[_Pending] = collections.deque()  # the model thread's own
        self._num_waiting = 0  # submitted and not yet admitted (both threads; under _lock)
        self._lock = threading.Lock()
        self._running: dict[int, _Running] = {}  # id(handle) -> request
        self._batch = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self.draining_since: float | None = None  # set by begin_shutdown (from a signal handler: no locks)
        self.failed: str | None = None  # why the model thread died, if it did
        # Counters for /health (written by the model thread only).
        self.running_rows = 0
        self.running_groups = 0  # passes per generation step: rows of one window run together (see ContinuousBatch)
        self.generated_tokens = 0
        self.served_requests = 0

    # --- the HTTP side's calls (event loop thread) -------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def submit_generation(self, prompts: list[list[int]], settings) -> RequestHandle:
        """Queue `prompts` (token ids) for generation with `settings`; the choices' events come to the handle."""
        handle = RequestHandle(asyncio.get_running_loop(), len(prompts) * settings.num_return_sequences)
        self._submit(_Pending(handle, time.monotonic(), prompts=prompts, settings=settings))
        return handle

    async def run_job(self, job: Callable[[], Any]) -> Any:
        """Run `job()` on the model thread (in arrival order with the other jobs) and return its result; a
        UserError it raises is a 400."""
        loop = asyncio.get_running_loop()
        pending = _Pending(RequestHandle(loop, 0), time.monotonic(), job=job, future=loop.create_future())
        self._submit(pending)
        try:
            return await asyncio.wait_for(pending.future, self.queue_timeout + self.stall_timeout)
        except TimeoutError:
            pending.handle.cancel()
            raise APIError(504, "the model did not answer in time: try again later") from None

    def _submit(self, pending: _Pending) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.failed is not None:
            raise APIError(503, f"the model thread has stopped: {self.failed}")
        with self._lock:
            if self._num_waiting >= self.max_waiting:
                raise APIError(503, f"the server is overloaded ({self._num_waiting} requests waiting): try again "
                               "later", code="overloaded")
            self._num_waiting += 1
        self._inbox.put(pending)

    def begin_shutdown(self) -> None:
        """Stop admitting requests; the running ones get `shutdown_timeout` seconds. Safe in a signal handler."""
        if self.draining_since is None:
            self.draining_since = time.monotonic()

    # --- lifetime ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="perceiver-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the model thread (after the HTTP server has stopped); requests still there end with 503."""
        self.begin_shutdown()
        self._stop = True
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the model thread --------------------------------------------------------------------------------------

    def _main(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                if self.task == "clm":
                    from perceiver_cli.generation import ContinuousBatch

                    self._batch = ContinuousBatch(self.model, self.tokenizer, self.schedule)
                while not self._stop:
                    self._loop_once()
        except BaseException as err:  # noqa: BLE001 - a bug: say so on every route, never hang
            self.failed = first_line(err)
            log.error("the model thread stopped: %s", traceback.format_exc())
        finally:
            for request in list(self._running.values()):
                self._send(request.handle, [Event("error", error=APIError(503, "the server stopped"))])
            self._running.clear()
            self._fail_waiting(APIError(503, "the server stopped"))

    def _loop_once(self) -> None:
        idle = not self._running and not self._waiting
        self._receive(block=idle)
        now = time.monotonic()
        if self.draining:
            self._fail_waiting(APIError(503, "the server is shutting down", code="shutting_down"))
            if now - self.draining_since > self.shutdown_timeout:
                self._end_running("abort")
        else:
            self._expire_waiting(now)
            self._admit()
        self._drop_cancelled()
        if self._running:
            self._step()

    def _receive(self, block: bool) -> None:
        """Move what arrived into the waiting line; jobs (fill-mask) run at once, in order."""
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item.job is not None:
                self._uncount(1)
                self._run_job(item)
            else:
                self._waiting.append(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _uncount(self, n: int) -> None:
        with self._lock:
            self._num_waiting -= n

    def _run_job(self, item: _Pending) -> None:
        if item.handle.cancelled:
            return
        if self.draining:
            self._resolve(item, error=APIError(503, "the server is shutting down", code="shutting_down"))
            return
        if time.monotonic() - item.enqueued > self.queue_timeout:
            self._resolve(item, error=self._queue_timeout_error())
            return
        try:
            self._resolve(item, result=item.job())
        except UserError as err:
            self._resolve(item, error=APIError(400, err.message))
        except Exception as err:  # noqa: BLE001 - the request fails, the server goes on
            log.error("a job failed: %s", traceback.format_exc())
            self._resolve(item, error=APIError(500, f"the model failed: {first_line(err)}"))

    @staticmethod
    def _resolve(item: _Pending, result: Any = None, error: APIError | None = None) -> None:
        def resolve() -> None:
            if not item.future.done():
                if error is None:
                    item.future.set_result(result)
                else:
                    item.future.set_exception(error)

        _call_in_loop(item.handle.loop, resolve)

    def _queue_timeout_error(self) -> APIError:
        return APIError(503, f"no slot came free within {self.queue_timeout:g} s: the server is busy, try again later",
                        code="queue_timeout")

    def _expire_waiting(self, now: float) -> None:
        if self._waiting and now - self._waiting[0].enqueued > self.queue_timeout:
            kept = collections.deque()
            for item in self._waiting:
                if now - item.enqueued > self.queue_timeout:
                    self._uncount(1)
                    self._send(item.handle, [Event("error", error=self._queue_timeout_error())])
                else:
                    kept.append(item)
            self._waiting = kept

    def _fail_waiting(self, error: APIError) -> None:
        items = list(self._waiting)
        self._waiting.clear()
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            self._uncount(1)
            if item.job is not None:
                self._resolve(item, error=error)
            else:
                self._send(item.handle, [Event("error", error=error)])

    def _admit(self) -> None:
        """Start the waiting requests that fit, in arrival order, all in one `ContinuousBatch.add` (prompts of one
        length share a pass)."""
        if self._batch is None:  # a masked LM: jobs only
            return
        admitted, rows = [], self._batch.num_rows
        while self._waiting and rows + self._waiting[0].num_rows <= self.max_batch_rows:
            item = self._waiting.popleft()
            self._uncount(1)
            if not item.handle.cancelled:
                admitted.append(item)
                rows += item.num_rows
        if not admitted:
            return
        prompts = [(ids, item.settings, (item, p)) for item in admitted for p, ids in enumerate(item.prompts)]
        try:
            members = self._batch.add(prompts)
        except Exception as err:  # noqa: BLE001
            self._fail_batch(err, also=admitted)
            return
        for item in admitted:
            self._running[id(item.handle)] = _Running(item.handle, remaining=len(item.prompts))
        for member in members:
            self._running[id(member.key[0].handle)].members.append(member)
        self._count_rows()

    def _drop_cancelled(self) -> None:
        for key, request in list(self._running.items()):
            if request.handle.cancelled:
                for member in request.members:
                    self._batch.end(member)
                del self._running[key]
        self._count_rows()

    def _end_running(self, reason: str) -> None:
        updates = []
        for request in self._running.values():
            for member in request.members:
                updates += self._batch.end(member, reason)
        self._deliver(updates)

    def _step(self) -> None:
        try:
            updates = self._batch.step()
        except Exception as err:  # noqa: BLE001
            self._fail_batch(err)
            return
        self.generated_tokens += self.running_rows
        self._deliver(updates)
        self._count_rows()

    def _deliver(self, updates) -> None:
        """Turn the updates of a step into each request's events (one call into the event loop for all of them),
        and let requests whose prompts are all done leave."""
        by_request: dict[int, tuple[RequestHandle, list[Event]]] = {}
        done = []
        for update in updates:
            item, p = update.member.key
            _, events = by_request.setdefault(id(item.handle), (item.handle, []))
            index = p * item.settings.num_return_sequences + update.index
            if update.text:
                events.append(Event("text", index, update.text))
            if update.finish_reason is not None:
                num_tokens = update.member.sequences[update.index].num_tokens
                events.append(Event("finish", index, finish_reason=update.finish_reason, num_tokens=num_tokens))
            if update.member.done and update.member not in done:
                done.append(update.member)
        for member in done:
            request = self._running.get(id(member.key[0].handle))
            if request is not None and member in request.members:
                request.members.remove(member)
                request.remaining -= 1
                if request.remaining == 0:
                    del self._running[id(request.handle)]
                    self.served_requests += 1
        self._send_many(list(by_request.values()))

    def _fail_batch(self, err: Exception, also: list[_Pending] = ()) -> None:
        """A model call failed: its requests end with a 500, the batch starts afresh, the server goes on."""
        log.error("generation failed: %s", traceback.format_exc())
        error = APIError(500, f"generation failed: {first_line(err)}")
        handles = [request.handle for request in self._running.values()] + [item.handle for item in also]
        self._send_many([(handle, [Event("error", error=error)]) for handle in handles])
        self._running.clear()
        from perceiver_cli.generation import ContinuousBatch

        self._batch = ContinuousBatch(self.model, self.tokenizer, self.schedule)
        self._count_rows()

    def _count_rows(self) -> None:
        if self._batch is not None:
            self.running_rows = self._batch.num_rows
            self.running_groups = len(self._batch.stepper.groups)

    def _send(self, handle: RequestHandle, events: list[Event]) -> None:
        self._send_many([(handle, events)])

    @staticmethod
    def _send_many(batches: list[tuple[RequestHandle, list[Event]]]) -> None:
        by_loop: dict[int, list] = {}
        for handle, events in batches:
            if events and not handle.cancelled:
                by_loop.setdefault(id(handle.loop), []).append((handle, events))
        for items in by_loop.values():
            _call_in_loop(items[0][0].loop, _put_all, items)


def _put_all(items: list[tuple[RequestHandle, list[Event]]]) -> None:
    for handle, events in items:
        handle.events.put_nowait(events)


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass
