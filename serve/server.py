"""Running the page on uvicorn: the bind rules, and a server in a thread for tests and benches."""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

import uvicorn
from starlette.types import ASGIApp

from layerfed.serve.errors import PageError
from layerfed.serve.security import MIN_TOKEN_CHARS, is_loopback

__all__ = ["PageServer", "check_bind", "serve_forever"]

log = logging.getLogger("layerfed")


def check_bind(host: str, token: str | None) -> None:
    """Loopback needs nothing; any other address needs a token of at least 16 characters."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        expected = f"a token of at least {MIN_TOKEN_CHARS} characters"
        raise PageError("token", expected, f"{len(token)} characters")
    if token is None and not is_loopback(host):
        expected = "127.0.0.1 (or localhost), or a --token for any other address"
        raise PageError("host", expected, host)


def _config(app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
    )


def serve_forever(app: ASGIApp, host: str, port: int, token: str | None) -> None:
    """Serve ``app`` until interrupted (after :func:`check_bind`)."""
    check_bind(host, token)
    log.warning("feedback page on http://%s:%s/", host, port)
    uvicorn.Server(_config(app, host, port)).run()


class PageServer:
    """uvicorn in a background thread on ``host`` and a free port (``port=0``)."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._server = uvicorn.Server(_config(app, host, port))
        self._thread = threading.Thread(target=self._server.run, name="page-server", daemon=True)

    @property
    def port(self) -> int:
        """The port the server listens on."""
        sockets = self._server.servers[0].sockets
        return int(sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> PageServer:
        """Start serving; return once the socket listens."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise PageError("server", f"a server listening within {timeout:g} s", self.host)
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> PageServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
