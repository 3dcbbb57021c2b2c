"""`layerfed simulate`: the federation on Flower's simulation engine, with a progress bar."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from layerfed.errors import LayerfedError
from layerfed.federation.server_app import verified_policy
from layerfed.federation.server_state import STATE_FILE, ServerState
from layerfed.governance.trust import RESEARCH
from layerfed.simulation.client import gym_client_app
from layerfed.simulation.server import gym_placement, gym_server_app, gym_state
from layerfed.simulation.settings import SimSettings

__all__ = ["SimulationError", "simulate"]

log = logging.getLogger("layerfed")


class SimulationError(LayerfedError):
    """The simulation could not start or did not reach its last round."""


def _backend(num_cpus: int, num_gpus: float = 0.0) -> dict[str, Any]:
    """Flower's simulation backend: one CPU and ``num_gpus`` of a GPU per virtual client."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": num_gpus},
        "init_args": {"num_cpus": num_cpus, "include_dashboard": False, "log_to_driver": False},
    }


def simulate(
    settings: SimSettings,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    *,
    server_app: ServerApp | None = None,
    client_app: ClientApp | None = None,
) -> ServerState:
    """Run ``settings`` to its last round on Flower's simulation engine (Ray).

    ``server_app`` / ``client_app`` replace the gym's own (tests wrap them to watch
    the wire or to drop nodes mid-protocol); by default they are built from ``settings``.
    """
    from flwr.simulation import run_simulation

    settings = settings.resolved()
    verified_policy(settings, rules=RESEARCH)  # refuse before starting Ray
    state_file = settings.out_dir / "state" / STATE_FILE
    if state_file.exists() and not settings.resume:
        raise SimulationError(
            f"{settings.out_dir}: expected an empty output folder, got an earlier run (use --resume or another --out)"
        )
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    cpus = int(os.environ.get("LAYERFED_CPUS", "2"))
    run_simulation(
        server_app=server_app or gym_server_app(settings, on_round),
        client_app=client_app or gym_client_app(settings),
        num_supernodes=gym_placement(settings).nodes,
        backend_config=_backend(cpus, settings.gpus_per_client(cpus)),
    )
    state = gym_state(settings)
    if not state.load() or state.round < settings.rounds:
        raise SimulationError(
            f"{settings.out_dir}: expected {settings.rounds} rounds, got {state.round}; see {Path(settings.out) / 'audit.jsonl'} and the log above"
        )
    return state
