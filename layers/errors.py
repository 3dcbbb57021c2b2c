"""Errors the layer stack can raise: one typed family under :class:`LayerError`.

Each message names the thing at fault (file, slot, array or parameter), what
was expected and what was got.
"""

from __future__ import annotations

from layerfed.errors import LayerfedError

__all__ = [
    "ArrayError",
    "BaseModelError",
    "DecayError",
    "LayerError",
    "RedLineViolation",
    "ScopeError",
    "SlotError",
    "SlotStoreError",
]


class LayerError(LayerfedError):
    """Base of every error raised by :mod:`layerfed.layers`."""


class BaseModelError(LayerError):
    """The base model or tokenizer could not be loaded from the path the policy names."""


class SlotError(LayerError):
    """A slot id, layer or memory name does not fit the policy or the stack's state."""


class ArrayError(LayerError):
    """A slot's arrays are missing, unexpected, mis-shaped or not finite."""


class ScopeError(LayerError):
    """An update or a scope would touch a parameter outside the layer's scope."""


class RedLineViolation(LayerError):  # noqa: N818 (the issue's name)
    """A red-line parameter changed, or an update or scope would change one."""


class DecayError(LayerError):
    """A decay was asked for with a negative or non-finite elapsed time."""


class SlotStoreError(LayerError):
    """A slot file or the manifest is missing, corrupt or partial; the message names the file."""
