"""The page's errors: out-of-range requests and requests refused outright."""

from __future__ import annotations

from layerfed.clients.events import FieldError
from layerfed.errors import LayerfedError

__all__ = ["PageError", "RequestError"]


class PageError(FieldError):
    """A request or setting of the page is out of range (prompt too long, short token, ...)."""


class RequestError(LayerfedError):
    """A request the page refuses: carries the HTTP status and a message for the person."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)
