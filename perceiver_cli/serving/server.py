"""uvicorn around the app, with the stop a server needs: SIGTERM (or Ctrl-C) closes the listening socket at once,
new requests on open connections get 503, the streams in flight get `shutdown_timeout` seconds to finish and are
then ended cleanly (finish_reason "abort", then `[DONE]`), and the process exits with status 0."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading

import uvicorn

from perceiver_cli.errors import UserError
from perceiver_cli.serving.engine import Engine


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, host: str):
        super().__init__(config)
        self.engine = engine
        self.host = host

    def handle_exit(self, sig, frame) -> None:
        self.engine.begin_shutdown()  # no admissions from now on; the running requests get their grace
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's, without raising the signal again after the graceful stop (which would end the process with
        the signal's status instead of 0)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            port = self.servers[0].sockets[0].getsockname()[1]
            host = f"[{self.host}]" if ":" in self.host else self.host
            print(f"serving {self.engine.model_id} ({self.engine.task}) on http://{host}:{port} (Ctrl-C or SIGTERM "
                  "to stop)", file=sys.stderr, flush=True)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a UserError saying why not (port in use, unknown host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise UserError(f"cannot listen on {host!r}: {err.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        hint = ": choose another with --port" if err.errno in (98, 48) else ""
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror}{hint}") from None
    sock.set_inheritable(True)
    return sock


def serve(engine: Engine, app, host: str, port: int, access_log: bool = False) -> None:
    """Serve `app` on host:port until SIGTERM or Ctrl-C; the engine's thread runs meanwhile."""
    sock = bind(host, port)
    config = uvicorn.Config(
        app,
        log_level="info" if access_log else "warning",  # uvicorn's access log is at info level
        access_log=access_log,
        lifespan="off",
        http="h11",
        loop="asyncio",
        ws="none",
        server_header=False,
        # A backstop: the engine ends the running requests after shutdown_timeout; their last bytes then go out.
        timeout_graceful_shutdown=engine.shutdown_timeout + 3,
    )
    server = _Server(config, engine, host)
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop(timeout=5)
        sock.close()
    if engine.failed is not None:
        raise UserError(f"the model thread failed: {engine.failed}")
