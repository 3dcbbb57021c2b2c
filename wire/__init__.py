"""The wire protocol between the ServerApp and the ClientApp: record names and codecs.

Both :mod:`layerfed.clients` and :mod:`layerfed.federation` import this module and
nothing of each other. Names load on first use, so reading a node config
(:mod:`layerfed.wire.node_config`) imports neither torch nor Flower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfed._lazy import lazy_getattr

if TYPE_CHECKING:
    from layerfed.wire.protocol import Identity, MessageError, Roster, Task

__all__ = ["Identity", "MessageError", "Roster", "Task"]

__getattr__ = lazy_getattr(
    __name__, {name: "layerfed.wire.protocol" for name in __all__}, globals()
)
