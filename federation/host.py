"""What the process hosting a run injects into :func:`~layerfed.federation.server_app.run_server`.

The server decides nothing from flags about who hosts it: it is handed objects.
:data:`DEPLOYED_HOST` (every default) is what a deployed ``ServerApp`` gets: the
:data:`~layerfed.governance.trust.DEPLOYMENT` trust rules, nodes discovered by
``query``, the configured server key, noise from OS entropy. A research host (the gym)
builds its own :class:`Host` from above and passes it in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from layerfed.federation.run_config import RunConfigError, RunSettings
from layerfed.federation.server_state import InstanceSlots
from layerfed.governance.keys import load_private_key
from layerfed.governance.schema import Policy, Principal
from layerfed.governance.trust import DEPLOYMENT, TrustRules
from layerfed.wire.protocol import Roster

__all__ = [
    "DEPLOYED_HOST",
    "Host",
    "InstanceSlots",
    "Placement",
    "Principals",
    "ServerKeySource",
    "configured_server_key",
]

ServerKeySource = Callable[[RunSettings], tuple[Ed25519PrivateKey, str]]
"""The key that signs checkpoints and where it came from (audited)."""
Principals = Callable[[Policy], Sequence[Principal]]
"""Principals a host adds to the verified policy (audited by name)."""


@dataclass(frozen=True)
class Placement:
    """Instances known up front, run on a pool of ``nodes`` stateless nodes.

    A task names the roster instance it is for, so no node is asked who it is; the
    pool needs as many nodes as one round has tasks. Without a placement the
    server discovers deployed nodes, each serving its own instance.
    """

    roster: Roster
    nodes: int


def configured_server_key(settings: RunSettings) -> tuple[Ed25519PrivateKey, str]:
    """``layerfed-server-key`` (PEM), refused when none is named."""
    if not settings.server_key:
        raise RunConfigError(
            "run config layerfed-server-key: expected the server's Ed25519 private key "
            "(`layerfed keys new`) to sign checkpoints, got none"
        )
    return load_private_key(Path(settings.server_key)), "configured"


@dataclass(frozen=True)
class Host:
    """Objects a host hands the server; the defaults are a deployment's."""

    trust: TrustRules = DEPLOYMENT
    principals: Principals | None = None
    placement: Placement | None = None
    server_key: ServerKeySource = configured_server_key
    noise_seed: int | None = None
    """Seed of server-side DP noise; None draws it from OS entropy (deployments)."""
    instance_slots: InstanceSlots | None = None
    """Instance-owned slots the host can see, added to the state digest."""
    refuse_red_line_breach: bool = True
    """Refuse to start when a red-line suite is over its threshold on the base and the policy
    does not acknowledge it (a research host studying untaught bases may only warn)."""
    report_each_round: bool = True
    """Rewrite OUT/report.md and report.html after each round (a research host writes its own)."""


DEPLOYED_HOST = Host()
"""A deployed ServerApp: nothing relaxed, nothing added."""
