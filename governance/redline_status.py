"""Each red-line probe suite's rate against its threshold, and the start-up refusal.

A suite whose violation rate on the base model (round 0, before any layer
trains) is over its ``max_violation_rate`` is *breached from the start*: the
server refuses to start (:class:`RedLineBreachError`) unless the policy says so
itself, with ``acknowledge_breach: true`` and a ``breach_reason`` on that suite.
``policy check --model``, the server's start and the run report all print the
same lines (:func:`status_line`). The rates are measured below governance (no
torch here): callers hand them in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from layerfed.errors import LayerfedError
from layerfed.governance.schema import Policy

__all__ = [
    "RedLineBreachError",
    "SuiteStatus",
    "red_line_status",
    "refuse_unacknowledged",
    "status_line",
]


class RedLineBreachError(LayerfedError):
    """A red-line suite is over its threshold before any training, and the policy does not say so."""


@dataclass(frozen=True)
class SuiteStatus:
    """One red-line suite's violation rate against its threshold."""

    suite: str
    rate: float
    max_rate: float
    acknowledged: bool = False
    reason: str = ""

    @property
    def breached(self) -> bool:
        """Whether the rate is over the threshold."""
        return self.rate > self.max_rate

    @property
    def refused(self) -> bool:
        """Breached and not acknowledged by the policy: the start is refused."""
        return self.breached and not self.acknowledged

    @property
    def verdict(self) -> str:
        """``ok``, ``BREACHED`` or ``BREACHED (acknowledged: reason)``."""
        if not self.breached:
            return "ok"
        return f"BREACHED (acknowledged: {self.reason})" if self.acknowledged else "BREACHED"

    def as_dict(self) -> dict[str, object]:
        """The status as an audit record or report holds it."""
        return {
            "suite": self.suite,
            "rate": self.rate,
            "max_violation_rate": self.max_rate,
            "breached": self.breached,
            "acknowledged": self.acknowledged,
            "reason": self.reason,
        }


def red_line_status(policy: Policy, rates: Mapping[str, float]) -> list[SuiteStatus]:
    """Each of ``policy``'s red-line suites with its measured rate (suites not in ``rates`` left out)."""
    return [
        SuiteStatus(
            p.suite,
            float(rates[p.suite]),
            p.max_violation_rate,
            acknowledged=p.acknowledge_breach,
            reason=p.breach_reason.strip(),
        )
        for p in policy.red_lines.probes
        if p.suite in rates
    ]


def status_line(status: SuiteStatus) -> str:
    """``red line SUITE: violation rate R vs max M: VERDICT`` (one line)."""
    return (
        f"red line {status.suite}: violation rate {status.rate:.3g} "
        f"vs max {status.max_rate:g}: {status.verdict}"
    )


def refuse_unacknowledged(statuses: Sequence[SuiteStatus], where: str) -> None:
    """Raise :class:`RedLineBreachError` naming every breached suite the policy does not acknowledge.

    ``where`` names what was measured (e.g. ``"base model builtin:tiny"``).
    """
    refused = [s for s in statuses if s.refused]
    if not refused:
        return
    parts = "; ".join(
        f"red_lines.probes[suite={s.suite}]: expected violation rate <= {s.max_rate:g}, "
        f"got {s.rate:.3g}"
        for s in refused
    )
    raise RedLineBreachError(
        f"{where}: {parts} before any training (fix the base or the suite, or set "
        "acknowledge_breach: true with a breach_reason on that suite)"
    )
