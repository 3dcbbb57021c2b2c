"""The gym's side of the ServerApp: the objects it injects into ``run_server``.

The server decides nothing from a simulation flag; the gym hands it a
:class:`~layerfed.federation.host.Host`: research trust rules (the demo root and
``--no-verify`` runs allowed, both audited), its seed-derived principals, the scenario's
roster on a pool of virtual nodes, a per-run server key in the out dir, the run's seed
for server-side noise, and the instance slots its nodes keep under ``state/instances``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from layerfed.federation.host import Host, Placement, configured_server_key
from layerfed.federation.run_config import RunSettings
from layerfed.federation.server_app import run_server
from layerfed.federation.server_state import InstanceSlots, ServerState
from layerfed.governance.keys import generate_keypair, load_private_key
from layerfed.governance.schema import Policy, Principal
from layerfed.governance.trust import RESEARCH
from layerfed.layers.instance_disk import InstanceDisk
from layerfed.simulation.keys import sim_principals
from layerfed.simulation.settings import SimSettings
from layerfed.wire.protocol import Roster

__all__ = [
    "GYM_SERVER_KEY",
    "gym_host",
    "gym_placement",
    "gym_server_app",
    "gym_server_key",
    "gym_state",
    "instance_slots",
    "run_gym_server",
    "sim_node_count",
]

OnRound = Callable[[dict[str, Any]], None]
GYM_SERVER_KEY = "server-key"
"""The gym's per-run checkpoint key, ``<out>/server-key.pem`` (a disk attacker can read it)."""


def sim_node_count(policy: Policy, roster: Roster, sample_per_layer: Mapping[str, int]) -> int:
    """Virtual nodes a simulation needs: the most tasks one round can send.

    Each sampled instance gets one task per round, so the pool never needs more
    nodes than the per-layer sample sizes add up to (or the roster has instances).
    A node is an execution slot, not an instance: the task names the instance, and
    shared slots a node caches (by version) serve whichever instance it runs next.
    """
    total = 0
    for layer in policy.layers:
        eligible = len(roster.eligible(layer.name))
        total += max(0, min(sample_per_layer.get(layer.name, eligible), eligible))
    return max(1, min(len(roster), total))


def gym_server_key(settings: RunSettings) -> tuple[Ed25519PrivateKey, str]:
    """The configured server key, else the run's own ``<out>/server-key.pem`` (made once)."""
    if settings.server_key:
        return configured_server_key(settings)
    path = settings.out_dir / f"{GYM_SERVER_KEY}.pem"
    if path.exists():
        return load_private_key(path), "gym: per-run key in the out dir"
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    generate_keypair(GYM_SERVER_KEY, settings.out_dir)
    return load_private_key(path), "gym: generated per-run key in the out dir"


def instance_slots(out_dir: Path) -> InstanceSlots:
    """The slots the gym's instances keep under ``<out>/state/instances/<id>``, by id."""

    def saved(round_: int) -> Iterator[tuple[str, Mapping[str, np.ndarray[Any, Any]]]]:
        instances = out_dir / "state" / "instances"
        if not instances.is_dir():
            return
        for folder in sorted(instances.iterdir()):
            found = InstanceDisk(folder).load_before(round_ + 1)
            if found is not None:
                yield f"{folder.name}@{found[0]}", found[1]

    return saved


def _principals(policy: Policy, *, seed: int) -> list[Principal]:
    return list(sim_principals(policy, seed))


def gym_host(settings: RunSettings, placement: Placement | None = None) -> Host:
    """What the gym injects into ``run_server`` for ``settings`` (resolved: a known seed).

    ``placement`` puts the scenario's instances on a pool of virtual nodes; without one
    (tests that stop before round 1, or route nodes themselves) nodes are discovered.
    """
    return Host(
        trust=RESEARCH,
        principals=functools.partial(_principals, seed=settings.seed),
        placement=placement,
        server_key=gym_server_key,
        noise_seed=settings.seed,
        instance_slots=instance_slots(settings.out_dir),
        refuse_red_line_breach=False,  # experiments start from untaught bases: warn, audit
        report_each_round=False,  # `layerfed simulate` writes its report once, at the end
    )


def gym_placement(settings: SimSettings) -> Placement:
    """The scenario's roster on as many virtual nodes as one round has tasks."""
    roster = settings.load_scenario().roster
    return Placement(roster, sim_node_count(settings.load_policy(), roster, settings.sampling()))


def gym_state(settings: SimSettings) -> ServerState:
    """The run's state as the gym sees it: the server's, plus its instances' own slots."""
    return ServerState(
        settings.out_dir,
        settings.load_policy(),
        settings.run_id,
        instance_slots=instance_slots(settings.out_dir),
    )


def run_gym_server(
    grid: Grid, context: Context, settings: SimSettings, on_round: OnRound | None = None
) -> ServerState:
    """:func:`run_server` with the gym's :class:`~layerfed.federation.host.Host`."""
    settings = settings.resolved()
    host = gym_host(settings, gym_placement(settings))
    return run_server(grid, context, settings, on_round, host=host)


def gym_server_app(settings: SimSettings, on_round: OnRound | None = None) -> ServerApp:
    """A ServerApp running one simulated federation."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_gym_server(grid, context, settings, on_round)

    return app
