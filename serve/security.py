"""Who may use the page, and reading a request body safely.

- Without a token the page answers only loopback clients whose ``Host`` header is
  exactly ``127.0.0.1``, ``localhost`` or ``[::1]``, optionally with ``:port``
  (:func:`host_allowed`): a web page elsewhere cannot reach it, and DNS rebinding
  (``[::1].evil.example``, ``127.0.0.1:80@evil.example``) fails on the ``Host`` check.
- With a token, a request carries it as ``Authorization: Bearer ...`` or as the
  session cookie set by visiting ``/?token=...`` once; both are compared in
  constant time (:func:`hmac.compare_digest`).
- Every state-changing request carries a CSRF token (``X-CSRF-Token``) equal to
  the ``layerfed_csrf`` cookie, signed with a per-process secret, and a JSON body
  (a cross-site form cannot send ``application/json`` without a preflight).
- Bodies are read up to a size limit and must be a JSON object in UTF-8, nested at
  most ``MAX_DEPTH`` deep, with finite numbers (no ``NaN``/``Infinity``) and no lone
  UTF-16 surrogate in a string; anything else is a 400 naming the problem.
- The token login redirects only to a same-site relative path
  (:func:`same_site_path`), never to ``//host`` or ``/\\host``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import re
import secrets
from typing import Any

from starlette.requests import Request

from layerfed.serve.errors import PageError, RequestError

__all__ = [
    "AUTH_COOKIE",
    "CSRF_COOKIE",
    "CSRF_HEADER",
    "MAX_DEPTH",
    "MIN_TOKEN_CHARS",
    "Access",
    "host_allowed",
    "is_loopback",
    "read_json",
    "same_site_path",
]

CSRF_COOKIE = "layerfed_csrf"
CSRF_HEADER = "x-csrf-token"
AUTH_COOKIE = "layerfed_auth"
MIN_TOKEN_CHARS = 16
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def is_loopback(host: str | None) -> bool:
    """``True`` for a loopback address or ``localhost``."""
    if host is None:
        return False
    name = host.strip().lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


_HOST = re.compile(r"(127\.0\.0\.1|localhost|\[::1\])(?::([0-9]{1,5}))?")
MAX_DEPTH = 32
"""How deep arrays and objects may nest in a request body."""
_SURROGATE = re.compile("[\ud800-\udfff]")


def host_allowed(header: str) -> bool:
    """Whether a ``Host`` header is exactly a loopback name, with an optional valid port."""
    match = _HOST.fullmatch(header.lower())
    return match is not None and (match.group(2) is None or 0 < int(match.group(2)) < 65536)


def same_site_path(path: str) -> str:
    """``path`` when a browser reads it as a path on this site, else ``/``.

    Refuses what a browser would take for another host or scheme: ``//host``,
    ``/\\host``, any backslash, control characters (browsers drop tabs and newlines).
    """
    if not path.startswith("/") or path[1:2] in ("/", "\\"):
        return "/"
    if "\\" in path or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "/"
    return path


class Access:
    """The page's access rules: optional bearer token, signed double-submit CSRF token."""

    def __init__(self, token: str | None = None, *, secret: bytes | None = None) -> None:
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            expected = f"a token of at least {MIN_TOKEN_CHARS} characters"
            raise PageError("token", expected, f"{len(token)} characters")
        self.token = token
        self._secret = secret or secrets.token_bytes(32)

    # -- authentication -----------------------------------------------------------------------

    def _sign(self, purpose: bytes, value: bytes) -> str:
        return hmac.new(self._secret, purpose + b":" + value, hashlib.sha256).hexdigest()

    def session_cookie(self) -> str:
        """The cookie value that proves the token was given (not the token itself)."""
        return self._sign(b"auth", (self.token or "").encode())

    def token_matches(self, given: str) -> bool:
        """Constant-time comparison of a presented token with the configured one."""
        if self.token is None:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def check_client(self, request: Request) -> None:
        """Raise :class:`RequestError` unless the request may see the page at all."""
        if self.token is None:
            client = request.client.host if request.client else None
            host = request.headers.get("host", "")
            if not is_loopback(client) or not host_allowed(host):
                raise RequestError(
                    403, "this page answers only on 127.0.0.1 (start it with a token)"
                )
            return
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and self.token_matches(auth[7:].strip()):
            return
        cookie = request.cookies.get(AUTH_COOKIE, "")
        if cookie and hmac.compare_digest(cookie.encode(), self.session_cookie().encode()):
            return
        raise RequestError(401, "a valid token is required (open the page as /?token=...)")

    # -- CSRF ---------------------------------------------------------------------------------

    def new_csrf(self) -> str:
        """A fresh CSRF token: a nonce and its signature."""
        nonce = secrets.token_hex(16)
        return f"{nonce}.{self._sign(b'csrf', nonce.encode())}"

    def csrf_valid(self, value: str | None) -> bool:
        """Whether ``value`` is a CSRF token this process signed."""
        if not value or value.count(".") != 1:
            return False
        nonce, signature = value.split(".")
        expected = self._sign(b"csrf", nonce.encode())
        return hmac.compare_digest(signature.encode(), expected.encode())

    def check_csrf(self, request: Request) -> None:
        """Raise :class:`RequestError` unless header and cookie carry the same signed token."""
        cookie = request.cookies.get(CSRF_COOKIE)
        header = request.headers.get(CSRF_HEADER)
        if not cookie or not header or not self.csrf_valid(cookie):
            raise RequestError(403, "missing or invalid CSRF token (reload the page)")
        if not hmac.compare_digest(cookie.encode(), header.encode()):
            raise RequestError(403, "the CSRF token does not match the cookie (reload the page)")
        origin = request.headers.get("origin")
        if origin and origin != "null":
            own = request.headers.get("host", "")
            if origin.split("://", 1)[-1] != own:
                raise RequestError(403, f"requests from {origin} are not accepted")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, at most ``limit`` bytes; :class:`RequestError` otherwise."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise RequestError(
            415, f"expected a JSON body (Content-Type: application/json), got {kind or 'none'!r}"
        )
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError(413, f"the body must be at most {limit} bytes, got {declared}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"the body must be at most {limit} bytes")
    data = _parse(bytes(body))
    if not isinstance(data, dict):
        raise RequestError(400, f"expected a JSON object, got {type(data).__name__}")
    return data


def _malformed(problem: str) -> RequestError:
    return RequestError(400, f"malformed JSON: {problem}")


def _constant(name: str) -> Any:
    raise _malformed(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _malformed(f"the number {text[:32]} is out of range")
    return value


def _parse(body: bytes) -> Any:
    """A request body's JSON value (UTF-8, finite numbers, bounded depth, no lone surrogate)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _malformed(f"the body is not UTF-8 ({e.reason} at byte {e.start})") from e
    try:
        data = json.loads(text, parse_constant=_constant, parse_float=_finite)
    except RecursionError as e:
        raise _malformed(f"nested deeper than {MAX_DEPTH} levels") from e
    except ValueError as e:
        raise _malformed(str(e)) from e
    _check_tree(data)
    return data


def _check_tree(data: Any) -> None:
    """Raise a 400 for nesting deeper than ``MAX_DEPTH`` or a lone surrogate in a string."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                raise _malformed(f"a lone UTF-16 surrogate in the string {value[:40]!a}")
        elif isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                raise _malformed(f"nested deeper than {MAX_DEPTH} levels")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
