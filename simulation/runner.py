"""Several federated runs inside one Flower simulation: one Ray start-up for many arms and seeds.

:func:`run_plans` starts Flower's simulation engine once; its ServerApp runs the
:class:`RunPlan` s on the same Grid, each as its own
:class:`~layerfed.federation.strategy.LayeredStrategy` run (own folder, state,
audit log, run id). Every message of a run carries that run's settings
(:data:`~layerfed.simulation.client.RUN_SETTINGS`), so the shared ClientApp
trains under the right policy and scenario.

``parallel`` runs go at once, each in its own thread on its own share of the
virtual nodes (a node caches the slots of one run at a time), so that one run's
clients train while another run's server aggregates and scores. A run's numbers do
not depend on what runs beside it: every random source is seeded per run, instance
and round, and nodes cache only what the server would otherwise resend.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from layerfed.errors import LayerfedError
from layerfed.simulation.client import RUN_SETTINGS, gym_client_app
from layerfed.simulation.evaluate import RunEvaluator
from layerfed.simulation.server import gym_placement, run_gym_server
from layerfed.simulation.settings import SimSettings

__all__ = ["RunPlan", "SettingsGrid", "run_plans"]

log = logging.getLogger("layerfed")
DEFAULT_LANES = 4
"""Runs at once: while some lanes' servers aggregate and score, the others' clients train
(on 2 cores, 4 lanes ran a 12-run subset in 87 s against 160 s with 2; each Ray worker
keeps one runtime per lane, see ``simulation/client.py``)."""
PULL_INTERVAL = 0.01
"""Seconds between polls for a round's replies (Flower's in-memory grid default: 0.1)."""


@dataclass(frozen=True)
class RunPlan:
    """One federated run of an experiment: an arm at a seed, with its settings."""

    experiment: str
    arm: str
    seed: int
    settings: SimSettings


class SettingsGrid(Grid):
    """A Grid that stamps every outgoing message with one run's settings."""

    def __init__(
        self, grid: Grid, settings: SimSettings, nodes: Sequence[int] | None = None
    ) -> None:
        self._grid = grid
        self._record = settings.to_config()
        self._nodes = list(nodes) if nodes is not None else None
        if isinstance(getattr(grid, "pull_interval", None), float):
            # Flower's in-memory grid polls for replies every 0.1 s: a round's replies
            # arrive up to that much late, hundreds of times per experiment.
            grid.pull_interval = min(grid.pull_interval, PULL_INTERVAL)  # type: ignore[attr-defined]

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
        """This run's share of the wrapped grid's nodes (all of them when not shared)."""
        if self._nodes is not None:
            return list(self._nodes)
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


def _run_one(
    grid: Grid, context: Context, plan: RunPlan, nodes: Sequence[int] | None
) -> tuple[RunEvaluator | None, str | None]:
    evaluator: RunEvaluator | None = None
    try:
        evaluator = RunEvaluator(plan.settings)
        run_gym_server(
            SettingsGrid(grid, plan.settings, nodes), context, plan.settings, evaluator.on_round
        )
    except (LayerfedError, OSError, ValueError, KeyError) as e:
        error = f"{type(e).__name__}: {e}"
        log.error("run %s failed: %s", plan.settings.run_id, error)
        return evaluator, error
    return evaluator, None


NODE_WAIT_S = 30.0
"""Longest wait at start-up for the simulation engine to register every virtual node."""


def _registered_nodes(grid: Grid, expected: int) -> list[int]:
    """The grid's node ids once ``expected`` are registered (or after :data:`NODE_WAIT_S`).

    Flower's simulation engine registers its virtual nodes in another thread while the
    ServerApp starts: read too early, the grid holds only some of them, and the runs
    would fall back to one lane.
    """
    deadline = time.monotonic() + NODE_WAIT_S
    ids = sorted(grid.get_node_ids())
    while len(ids) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
        ids = sorted(grid.get_node_ids())
    return ids


def _server_app(
    plans: Sequence[RunPlan], on_done: OnDone, parallel: int, per_run: int
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        todo: queue.Queue[RunPlan] = queue.Queue()
        for plan in plans:
            todo.put(plan)
        ids = _registered_nodes(grid, parallel * per_run)
        lanes = max(1, min(parallel, len(plans), len(ids) // per_run))
        log.info("gym: %s runs in %s lanes on %s virtual nodes", len(plans), lanes, len(ids))

        def lane(k: int) -> None:
            nodes = ids[k * per_run : (k + 1) * per_run] if lanes > 1 else None
            while True:
                try:
                    plan = todo.get_nowait()
                except queue.Empty:
                    return
                started = time.monotonic()
                evaluator, error = _run_one(grid, context, plan, nodes)
                on_done(plan, evaluator, time.monotonic() - started, error)

        threads = [
            threading.Thread(target=lane, args=(k,), name=f"gym-lane-{k}") for k in range(lanes)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    return app


def run_plans(
    plans: Sequence[RunPlan],
    on_done: OnDone,
    num_cpus: int | None = None,
    parallel: int | None = None,
) -> None:
    """Run every plan inside one Flower simulation (Ray), ``parallel`` at a time.

    Each of the ``parallel`` lanes has as many virtual nodes as the largest round of
    any plan needs (:func:`~layerfed.simulation.server.sim_node_count`); a run's
    strategy routes its sampled instances to its lane's nodes. ``parallel`` defaults
    to ``LAYERFED_GYM_PARALLEL`` or :data:`DEFAULT_LANES`.
    """
    from flwr.simulation import run_simulation

    if not plans:
        return
    resolved = [p.settings.resolved() for p in plans]
    per_run = max(gym_placement(s).nodes for s in resolved)
    lanes = parallel or int(os.environ.get("LAYERFED_GYM_PARALLEL", str(DEFAULT_LANES)))
    lanes = max(1, min(lanes, len(plans)))
    _warm_bases(resolved)
    cpus = num_cpus or int(os.environ.get("LAYERFED_CPUS", "2"))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(
        server_app=_server_app(plans, on_done, lanes, per_run),
        client_app=gym_client_app(plans[0].settings),
        num_supernodes=per_run * lanes,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": resolved[0].gpus_per_client(cpus)},
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False},
        },
    )


def _warm_bases(settings: Sequence[SimSettings]) -> None:
    """Load (pretrain and cache, the first time) every base before runs start in parallel."""
    from layerfed.layers.base import load_base

    seen = set()
    for s in settings:
        base = s.load_policy().base_model
        key = base.model_dump_json()
        if key not in seen:
            seen.add(key)
            load_base(base)
