"""Red lines enforced on every composition a candidate reaches, before any commit.

A slot's candidate (its committed arrays plus the step the vetoes let through,
computed once by the pipeline's step stage and handed in here) is composed with the committed slots of every *composition* it affects: the
distinct ``jurisdiction x groups`` combinations of known instances (discovered
nodes, or the roster a host's placement names) whose slots include it, deduplicated.
Per-instance slots never reach the server and are not part of a composition.
Each red-line probe suite's violation rate is measured on each such composed
model (all compositions and suites in one batch); a rate above the suite's
``max_violation_rate`` that is also above the committed composition's own rate
refuses the commit (a commit that lowers an already-too-high rate is a repair,
not a breach). The committed composition is measured only when the candidate is
over a threshold (below every threshold there is no breach whatever it was), and
then cached by slot versions, so each is measured at most once per version.

A suite protected by ``projection`` alone with the ``exact`` basis is not scored:
its sequences are provably unchanged on every composition (:func:`gated_probes`);
with a truncated basis the gate still scores it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from layerfed.federation.round_context import Profile, RoundContext
from layerfed.governance.schema import Policy, RedLineProbe
from layerfed.layers.arrays import Arrays
from layerfed.layers.slots import SlotId, slots_for_instance

__all__ = ["Breach", "affected_compositions", "gated_probes", "redline_breach"]


@dataclass(frozen=True)
class Breach:
    """The first red line a candidate crosses: on which composition, which suite, at what rate."""

    composition: tuple[str, ...]
    suite: str
    rate: float
    committed_rate: float
    max_rate: float


def gated_probes(policy: Policy) -> list[RedLineProbe]:
    """The red-line suites the gate scores: ``gate`` and ``both``, and ``projection`` with a
    truncated basis (its change on the probes is bounded, not zero, so it is still measured).

    A ``projection`` suite with the ``exact`` basis is skipped on every composition: every
    slot's A vanishes on the suite's base activations (the server refuses a slot, an update
    or a resume whose A is not its seed's projected by the recorded basis), so any
    composition scores those sequences as the base does, up to float rounding
    (:mod:`layerfed.layers.protect`).
    """
    return [p for p in policy.red_lines.probes if p.gates or p.basis != "exact"]


def affected_compositions(
    ctx: RoundContext, slot: SlotId, profiles: Iterable[Profile]
) -> list[list[SlotId]]:
    """Distinct shared-slot compositions that include ``slot`` (highest rank first)."""
    shared = {layer.name for layer in ctx.policy.layers if layer.slot_key != "instance"}
    seen: dict[tuple[SlotId, ...], list[SlotId]] = {}
    for jurisdiction, groups in profiles:
        slots = [
            s
            for s in slots_for_instance(ctx.policy, "composition", jurisdiction, groups)
            if s.layer in shared
        ]
        if slot in slots:
            seen.setdefault(tuple(slots), slots)
    if not seen:  # nobody known yet: the slot on top of the global slots
        globals_ = [SlotId(g.name, "global") for g in ctx.policy.layers if g.slot_key == "global"]
        names = [g for g in globals_ if g != slot] + [slot]
        seen[tuple(names)] = names
    return list(seen.values())


def redline_breach(
    ctx: RoundContext,
    slot: SlotId,
    candidate: Arrays,
    committed: Callable[[SlotId], Arrays],
) -> Breach | None:
    """The first red line ``candidate`` (``slot``'s arrays if committed) crosses, else None.

    ``candidate`` is what the commit would write; ``committed(s)`` gives every other
    slot's committed arrays (each read once). Every affected composition of
    ``ctx.profiles`` with the candidate is measured in one batch; the committed
    compositions of those over a threshold in a second one (cached by key).
    """
    probes = gated_probes(ctx.policy)
    if not probes:
        return None
    runner = ctx.probes
    suites = [p.suite for p in probes]
    compositions = affected_compositions(ctx, slot, ctx.profiles)
    afters = runner.measure_many(
        suites,
        [{s: candidate if s == slot else committed(s) for s in names} for names in compositions],
    )
    over = [
        (names, after, [p for p in probes if after[p.suite] > p.max_violation_rate])
        for names, after in zip(compositions, afters, strict=True)
    ]
    over = [o for o in over if o[2]]  # under every threshold: no breach whatever before was
    if not over:
        return None
    before_suites = list(dict.fromkeys(p.suite for _, _, ps in over for p in ps))
    befores = runner.rates_many(
        before_suites,
        [({s: committed(s) for s in names}, ctx.composition_key(names)) for names, _, _ in over],
    )
    for (names, after, crossed), before in zip(over, befores, strict=True):
        for probe in crossed:
            if after[probe.suite] > before[probe.suite]:
                return Breach(
                    tuple(str(s) for s in names),
                    probe.suite,
                    after[probe.suite],
                    before[probe.suite],
                    probe.max_violation_rate,
                )
    return None
