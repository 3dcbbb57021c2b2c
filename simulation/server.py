"""The gym's side of the ServerApp: the scenario's roster and the simulated principals."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from layerfed.federation.server_app import run_server
from layerfed.federation.server_state import ServerState
from layerfed.simulation.keys import sim_principals
from layerfed.simulation.settings import SimSettings

__all__ = ["gym_server_app", "run_gym_server"]

OnRound = Callable[[dict[str, Any]], None]


def run_gym_server(
    grid: Grid, context: Context, settings: SimSettings, on_round: OnRound | None = None
) -> ServerState:
    """:func:`run_server` with the scenario's roster and the gym's seed-derived principals."""
    settings = settings.resolved()
    return run_server(
        grid,
        context,
        settings,
        on_round,
        roster=settings.load_scenario().roster,
        principals=functools.partial(_principals, seed=settings.seed),
    )


def _principals(policy: Any, *, seed: int) -> list[Any]:
    return list(sim_principals(policy, seed))


def gym_server_app(settings: SimSettings, on_round: OnRound | None = None) -> ServerApp:
    """A ServerApp running one simulated federation."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_gym_server(grid, context, settings, on_round)

    return app
