"""The server side: the Flower ServerApp and the layered strategy (never imports clients)."""

from __future__ import annotations

from layerfed.federation.run_config import RunConfigError, RunSettings
from layerfed.federation.server_app import make_server_app, run_server, server_app, verified_policy
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
