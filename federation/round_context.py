"""What one round's processing reads and writes: its context and its report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from layerfed.federation.probes import ProbeRunner
from layerfed.federation.secure_sum import SecureSum
from layerfed.federation.server_state import ServerState
from layerfed.governance.audit import AuditLog
from layerfed.governance.schema import Policy
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack
from layerfed.wire.protocol import Identity, Task

__all__ = ["RoundContext", "RoundReport"]


@dataclass
class RoundContext:
    """Everything one round's processing reads or writes."""

    policy: Policy
    run_id: str
    round: int
    state: ServerState
    stack: LayerStack
    tokenizer: Any
    audit: AuditLog
    identities: dict[int, Identity]
    pending: dict[int, Task]
    probes: ProbeRunner
    secure: dict[SlotId, SecureSum] = field(default_factory=dict)
    """Secure-aggregation slots: their unmasked means (their tasks are not in ``pending``)."""
    noise_seed: int | None = None
    """Seed of central DP noise (the gym only); None draws it from the operating system."""
    profiles: frozenset[tuple[str, tuple[str, ...]]] = frozenset()
    """Known instances' (jurisdiction, groups): the compositions red lines are checked on."""

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
