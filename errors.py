"""The root of layerfed's typed error family."""

from __future__ import annotations

__all__ = ["LayerfedError"]


class LayerfedError(Exception):
    """Base of every error layerfed raises on bad input or untrusted data.

    Subpackages derive their own families from it; a caller that catches
    ``LayerfedError`` catches every error a user or a remote party can cause.
    """
