"""The wire protocol between the ServerApp and the ClientApp: record names and codecs.

Both :mod:`layerfed.clients` and :mod:`layerfed.federation` import this module and
nothing of each other.
"""

from __future__ import annotations

from layerfed.wire.protocol import Identity, MessageError, Roster, Task

__all__ = ["Identity", "MessageError", "Roster", "Task"]
