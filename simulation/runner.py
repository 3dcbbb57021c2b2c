"""Several federated runs inside one Flower simulation: one Ray start-up for many arms and seeds.

:func:`run_plans` starts Flower's simulation engine once; its ServerApp runs each
:class:`RunPlan` one after another on the same Grid, each as its own
:class:`~layerfed.federation.strategy.LayeredStrategy` run (own folder, state,
audit log, run id). Every message of a run carries that run's settings
(:data:`~layerfed.simulation.client.RUN_SETTINGS`), so the shared ClientApp
trains under the right policy and scenario; a node forgets the slots it cached
for an earlier run when a new run id reaches it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from layerfed.errors import LayerfedError
from layerfed.federation.strategy import sim_node_count
from layerfed.simulation.client import RUN_SETTINGS, gym_client_app
from layerfed.simulation.evaluate import RunEvaluator
from layerfed.simulation.server import run_gym_server
from layerfed.simulation.settings import SimSettings

__all__ = ["RunPlan", "SettingsGrid", "run_plans"]

log = logging.getLogger("layerfed")


@dataclass(frozen=True)
class RunPlan:
    """One federated run of an experiment: an arm at a seed, with its settings."""

    experiment: str
    arm: str
    seed: int
    settings: SimSettings


class SettingsGrid(Grid):
    """A Grid that stamps every outgoing message with one run's settings."""

    def __init__(self, grid: Grid, settings: SimSettings) -> None:
        self._grid = grid
        self._record = settings.to_config()

    def _stamp(self, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        for msg in out:
            msg.content[RUN_SETTINGS] = ConfigRecord(dict(self._record))
        return out

    def set_run(self, run: Any) -> None:
        """Delegate to the wrapped grid."""
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        """The wrapped grid's run."""
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Delegate to the wrapped grid."""
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegate to the wrapped grid."""
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Stamp, then push."""
        return self._grid.push_messages(self._stamp(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate to the wrapped grid."""
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Stamp, then send and receive."""
        return self._grid.send_and_receive(self._stamp(messages), timeout=timeout)


OnDone = Callable[[RunPlan, RunEvaluator | None, float, str | None], None]


def _server_app(plans: Sequence[RunPlan], on_done: OnDone) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        for plan in plans:
            started = time.monotonic()
            evaluator: RunEvaluator | None = None
            error = None
            try:
                evaluator = RunEvaluator(plan.settings)
                hook = evaluator.on_round
                run_gym_server(SettingsGrid(grid, plan.settings), context, plan.settings, hook)
            except (LayerfedError, OSError, ValueError, KeyError) as e:
                error = f"{type(e).__name__}: {e}"
                log.error("run %s failed: %s", plan.settings.run_id, error)
            on_done(plan, evaluator, time.monotonic() - started, error)

    return app


def run_plans(plans: Sequence[RunPlan], on_done: OnDone, num_cpus: int | None = None) -> None:
    """Run every plan, in order, inside one Flower simulation (Ray).

    The simulation has as many virtual nodes as the largest round of any plan needs
    (:func:`~layerfed.federation.strategy.sim_node_count`); each run's strategy
    routes its sampled instances to them, so smaller runs leave some nodes idle.
    """
    from flwr.simulation import run_simulation

    if not plans:
        return
    resolved = [p.settings.resolved() for p in plans]
    nodes = max(
        sim_node_count(s.load_policy(), s.load_scenario().roster, s.sampling()) for s in resolved
    )
    cpus = num_cpus or int(os.environ.get("LAYERFED_CPUS", "2"))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(
        server_app=_server_app(plans, on_done),
        client_app=gym_client_app(plans[0].settings),
        num_supernodes=nodes,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False},
        },
    )
