"""Running the app on uvicorn: ``Server`` (Ctrl-C / SIGTERM close the engine, then the server stops cleanly) and
``ServerThread`` (a server on a loopback port in a background thread, for tests, benchmarks and notebooks)."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from typing import Any, Callable, Iterator, Optional

import uvicorn

GRACEFUL_SHUTDOWN_S = 10  # the most time open connections get once the engine has cancelled their requests


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), bound before the server starts, so its port is known."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    """uvicorn's server, whose SIGINT/SIGTERM handler first calls on_signal (closing the engine, which cancels
    the running requests so their connections end) and then stops the server. uvicorn's own handler would re-raise
    the signal once the server has stopped, killing the process before the engine is closed."""

    def __init__(self, config: uvicorn.Config, on_signal: Optional[Callable[[], None]] = None):
        super().__init__(config)
        self.on_signal = on_signal
        self.signalled: Optional[int] = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(sig: int, frame: Any) -> None:
            if self.should_exit:  # a second Ctrl-C: stop waiting for connections
                self.force_exit = True
            self.should_exit = True
            if self.signalled is None and self.on_signal is not None:
                # off the event loop: closing the engine waits for its current step
                threading.Thread(target=self.on_signal, name="llama-serve-close", daemon=True).start()
            self.signalled = sig

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def config(app: Any, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                          access_log=log_level == "debug")  # fmt: skip


class ServerThread:
    """The app served on host:port (port 0: a free one) from a background thread; ``stop()`` (or leaving the
    ``with`` block) stops it. ``url`` is its base, e.g. http://127.0.0.1:41234."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.socket = bind(host, port)
        self.port = self.socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = Server(config(app, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="llama-serve", daemon=True)  # fmt: skip

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
