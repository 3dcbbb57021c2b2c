"""The server side: the Flower ServerApp and the layered strategy (never imports clients).

Names load on first use (:func:`__getattr__`), so importing one submodule does not
import the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfed._lazy import lazy_getattr

if TYPE_CHECKING:
    from layerfed.federation.run_config import RunConfigError, RunSettings
    from layerfed.federation.server_app import (
        make_server_app,
        run_server,
        server_app,
        verified_policy,
    )
    from layerfed.federation.server_state import ServerState
    from layerfed.federation.strategy import LayeredStrategy

__all__ = [
    "LayeredStrategy",
    "RunConfigError",
    "RunSettings",
    "ServerState",
    "make_server_app",
    "run_server",
    "server_app",
    "verified_policy",
]

_HOMES: dict[str, str] = {
    "LayeredStrategy": "layerfed.federation.strategy",
    "RunConfigError": "layerfed.federation.run_config",
    "RunSettings": "layerfed.federation.run_config",
    "ServerState": "layerfed.federation.server_state",
    "make_server_app": "layerfed.federation.server_app",
    "run_server": "layerfed.federation.server_app",
    "server_app": "layerfed.federation.server_app",
    "verified_policy": "layerfed.federation.server_app",
}
"""Where each public name lives."""


__getattr__ = lazy_getattr("layerfed.federation", _HOMES, globals())
