"""What one round's processing reads (:class:`RoundContext`) and what it yields (:class:`RoundReport`).

:class:`RoundContext` is frozen: the pipeline's stages read it and never write
to it. What a stage produces travels in its own typed result (see
:mod:`layerfed.federation.pipeline`); the pipeline folds those into the
:class:`RoundReport`. ``state`` is the server's slot store, read by the judge and
written by the commit stage only; ``audit`` is handed to the one recorder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from layerfed.federation.candidates import CandidateKeeper
from layerfed.federation.probes import ProbeRunner
from layerfed.federation.secure_sum import SecureSum
from layerfed.federation.server_state import ServerState
from layerfed.governance.audit import AuditLog
from layerfed.governance.schema import Policy
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack
from layerfed.wire.protocol import Identity, Task

__all__ = ["Profile", "RoundContext", "RoundReport"]

Profile = tuple[str, tuple[str, ...]]
"""An instance's composition profile: its jurisdiction and its groups."""


@dataclass(frozen=True)
class RoundContext:
    """Everything one round's processing reads (read-only)."""

    policy: Policy
    run_id: str
    round: int
    state: ServerState
    stack: LayerStack
    tokenizer: Any
    audit: AuditLog
    identities: Mapping[int, Identity]
    pending: Mapping[int, Task]
    probes: ProbeRunner
    secure: Mapping[SlotId, SecureSum] = field(default_factory=dict)
    """Secure-aggregation slots: their unmasked means (their tasks are not in ``pending``)."""
    noise_seed: int | None = None
    """Seed of central DP noise (the gym only); None draws it from the operating system."""
    profiles: frozenset[Profile] = frozenset()
    """Known instances' (jurisdiction, groups): the compositions red lines are checked on."""
    keep: CandidateKeeper | None = None
    """Where each slot's judged mean is kept for replay (``keep_candidates``); None: not kept."""

    def composition_key(self, slots: list[SlotId]) -> tuple[Any, ...]:
        """Names a committed composition: slot versions, plus the round when any decays."""
        decays = any(
            m.half_life is not None for s in slots for m in self.policy.layer(s.layer).memories
        )
        versions = tuple((str(s), self.state.version(s)) for s in slots)
        return (self.round, *versions) if decays else versions


@dataclass
class RoundReport:
    """What happened: metrics per layer, committed slots, nodes that failed."""

    metrics: dict[str, Any]
    summary: dict[str, float]
    committed: list[str] = field(default_factory=list)
    accepted: dict[str, str] = field(default_factory=dict)
    """Instance id -> digest of its update that a commit used (acknowledged next round)."""
    digests: dict[str, str] = field(default_factory=dict)
    """Instance id -> digest of every verified shared update this round."""
    unreachable: list[int] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    """Slots whose noisy (central DP) mean was computed this round: each a privacy release."""
