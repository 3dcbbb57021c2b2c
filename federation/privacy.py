"""Central differential privacy wraps a slot's aggregation: clip every reply, aggregate, noise.

The way Flower's ``DifferentialPrivacyServerSideFixedClipping`` wraps a strategy,
:func:`central_dp` wraps a :data:`SlotAggregator` (validate and aggregate,
:func:`validating`). For a ``central_dp`` layer each reply is clipped to
``clip_norm`` (L2, over all its arrays) and weighted equally, so one person moves
the slot's *sum* by at most ``clip_norm``; the inner aggregator validates and
averages the ``n`` survivors; the mean then gets N(0, (z * clip_norm / n)^2) on
every coordinate, once, which is noise of std ``z * clip_norm`` on the sum: one
Gaussian mechanism with noise multiplier ``z``
(:mod:`layerfed.governance.privacy_accounting`). The noise is added before the
server step and the vetoes, so what they judge and what is committed are both
post-processing of the noisy mean. Every noisy mean counts as a release
(``Aggregation.released``), committed or vetoed: a veto's verdict depends on it.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from layerfed.federation.aggregate import Reply, SlotOutcome, validate_and_aggregate
from layerfed.federation.events import Events, event
from layerfed.federation.validate import ReplyChecks
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.privacy_accounting import noise_multiplier
from layerfed.governance.schema import LayerPolicy, Privacy
from layerfed.layers.arrays import add_gaussian, clip_to_norm, noise_rng
from layerfed.layers.slots import SlotId

__all__ = [
    "Aggregation",
    "SlotAggregator",
    "central_dp",
    "clip_replies",
    "slot_aggregator",
    "validating",
]


@dataclass(frozen=True)
class Aggregation:
    """A slot's validated aggregate, the events its wrappers produced, whether it is a DP release."""

    outcome: SlotOutcome
    events: Events = ()
    released: bool = False


class SlotAggregator(Protocol):
    """Validates and aggregates one slot's replies."""

    def __call__(self, replies: Sequence[Reply], /) -> Aggregation:
        """The slot's :class:`Aggregation` of ``replies``."""
        ...


def validating(layer: LayerPolicy, checks: ReplyChecks) -> SlotAggregator:
    """Validate each reply against ``checks``, aggregate the survivors with the layer's aggregator."""

    def aggregate(replies: Sequence[Reply]) -> Aggregation:
        outcome = validate_and_aggregate(
            replies, layer.aggregator, checks, min_clients=layer.min_clients
        )
        return Aggregation(outcome)

    return aggregate


def clip_replies(replies: Sequence[Reply], clip_norm: float) -> list[Reply]:
    """Each reply clipped to ``clip_norm`` and given weight 1 (non-float replies left for validation)."""
    out = []
    for reply in replies:
        floats = all(a.dtype.kind == "f" for a in reply.arrays.values())
        arrays = clip_to_norm(reply.arrays, clip_norm).arrays if floats else reply.arrays
        out.append(Reply(arrays, 1.0, reply.client_id))
    return out


def central_dp(
    inner: SlotAggregator,
    privacy: Privacy,
    *,
    round_: int,
    slot: SlotId,
    noise_seed: int | None,
) -> SlotAggregator:
    """``inner`` under central DP: replies clipped to ``clip_norm``, the mean noised once."""
    clip_norm = privacy.clip_norm
    if clip_norm is None:
        raise ValueError(f"privacy.clip_norm of {slot}: expected a number for central_dp, got None")

    def aggregate(replies: Sequence[Reply]) -> Aggregation:
        inner_out = inner(clip_replies(replies, clip_norm))
        outcome = inner_out.outcome
        if outcome.result is None:
            return inner_out
        used = len(outcome.result.used)
        std = noise_multiplier(privacy) * clip_norm / used
        rng = noise_rng(noise_seed, [round_, zlib.crc32(str(slot).encode())])
        noisy = add_gaussian(outcome.result.arrays, std, rng)
        noise = event(
            AuditKind.PRIVACY_NOISE,
            round=round_,
            slot=str(slot),
            mode="central_dp",
            std=std,
            clip_norm=clip_norm,
            contributors=used,
        )
        result = dataclasses.replace(outcome.result, arrays=noisy)
        return Aggregation(
            dataclasses.replace(outcome, result=result), (*inner_out.events, noise), released=True
        )

    return aggregate


def slot_aggregator(
    layer: LayerPolicy, checks: ReplyChecks, *, round_: int, slot: SlotId, noise_seed: int | None
) -> SlotAggregator:
    """The layer's aggregator: :func:`validating`, wrapped by :func:`central_dp` when it asks."""
    plain = validating(layer, checks)
    privacy = layer.privacy
    if privacy is None or privacy.mode != "central_dp" or privacy.clip_norm is None:
        return plain
    return central_dp(plain, privacy, round_=round_, slot=slot, noise_seed=noise_seed)
