"""Built-in base models, found through the ``layerfed.base_models`` entry point group.

The core names no built-in model itself: a package (the gym, ``layerfed.simulation``,
or a third party) registers a zero-argument-plus-seed loader under a name, and a
policy's ``base_model: {builtin: NAME}`` selects it. Nothing is imported until a
policy asks for that name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from layerfed.layers.errors import BaseModelError

__all__ = ["BASE_MODEL_GROUP", "builtin_loader", "builtin_names"]

log = logging.getLogger("layerfed")
BASE_MODEL_GROUP = "layerfed.base_models"
"""Entry point group: ``NAME = "module:function"`` with ``function(seed) -> (model, tokenizer)``."""

Loader = Callable[[int], tuple[Any, Any]]


def builtin_names() -> list[str]:
    """Names of the registered built-in base models (nothing is imported)."""
    return sorted({ep.name for ep in entry_points(group=BASE_MODEL_GROUP)})


def builtin_loader(name: str) -> Loader:
    """The loader registered as ``name``; :class:`BaseModelError` naming the choices if none."""
    found = [ep for ep in entry_points(group=BASE_MODEL_GROUP) if ep.name == name]
    if not found:
        choices = ", ".join(builtin_names()) or "none registered"
        raise BaseModelError(f"base_model.builtin: expected one of {choices}, got {name!r}")
    loader: Loader = found[0].load()
    log.debug("built-in base model %s from %s", name, found[0].value)
    return loader
