"""The errors an :class:`~layerfed.clients.instance.Instance` raises (and its helpers)."""

from __future__ import annotations

from layerfed.clients.events import FieldError

__all__ = ["InstanceError", "NoFeedback"]


class InstanceError(FieldError):
    """An instance was asked for something its policy, slots or keys do not allow."""


class NoFeedback(InstanceError):  # noqa: N818 (a condition, not a failure)
    """A round found no pending feedback in the journal: nothing to train, nothing to send."""
