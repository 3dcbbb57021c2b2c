"""Running the page on uvicorn: the bind rules, and a server in a thread for tests and benches."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import uvicorn
from starlette.types import ASGIApp

from layerfed.serve.errors import PageError
from layerfed.serve.security import MIN_TOKEN_CHARS, is_loopback

if TYPE_CHECKING:
    from layerfed.clients.config import InstanceConfig

__all__ = ["PageServer", "check_bind", "check_demo_keys", "serve_forever"]

log = logging.getLogger("layerfed")


def check_bind(host: str, token: str | None) -> None:
    """Loopback needs nothing; any other address needs a token of at least 16 characters."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        expected = f"a token of at least {MIN_TOKEN_CHARS} characters"
        raise PageError("token", expected, f"{len(token)} characters")
    if token is None and not is_loopback(host):
        expected = "127.0.0.1 (or localhost), or a --token for any other address"
        raise PageError("host", expected, host)


def _demo_key_file(path: Path | None) -> bool:
    """Whether ``path`` is one of the demo keys shipped in ``examples/keys``."""
    from layerfed.governance.signing import DEMO_ROOT_KEY

    return path is not None and path.resolve().parent == DEMO_ROOT_KEY.resolve().parent


def check_demo_keys(config: InstanceConfig, host: str) -> list[str]:
    """The demo keys ``config`` uses (their private halves are public), as warning lines.

    On loopback the page serves with them (to try it); on any other address it refuses
    (:class:`PageError` naming the setting).
    """
    from layerfed.governance.keys import load_public_key
    from layerfed.governance.signing import is_demo_root

    used: list[tuple[str, str]] = []
    if config.verify and config.root_key is not None:
        root = config.root_key
        if _demo_key_file(root) or (root.is_file() and is_demo_root([load_public_key(root)])):
            used.append(("policy.root_key", str(root)))
    if _demo_key_file(config.key):
        used.append(("keys.key", str(config.key)))
    if not used:
        return []
    if not is_loopback(host):
        field, path = used[0]
        raise PageError(field, "your own key to serve beyond 127.0.0.1 (not a demo key)", path)
    return [
        "!" * 72,
        *(f"!! DEMO KEY {field} = {path}" for field, path in used),
        "!! Its private half ships with layerfed: anyone can sign a policy it trusts.",
        "!! Fine for trying the page on 127.0.0.1; make your own (`layerfed keys new`).",
        "!" * 72,
    ]


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
    log.info("feedback page on http://%s:%s/", host, port)
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
