"""Central differential privacy of a slot: clip every reply, aggregate, noise the mean.

:func:`slot_outcome` replaces the plain validate-and-aggregate step of
:func:`layerfed.federation.round._commit_slot`. For a ``central_dp`` layer each
reply is clipped to ``clip_norm`` (L2, over all its arrays) and weighted equally,
so one person moves the slot's *sum* by at most ``clip_norm``; the FedAvg mean of
the ``n`` survivors then gets N(0, (z * clip_norm / n)^2) on every coordinate,
which is noise of std ``z * clip_norm`` on the sum: one Gaussian mechanism with
noise multiplier ``z`` (:mod:`layerfed.governance.privacy_accounting`). The noise
is added before the server step and the vetoes, so what they judge and what is
committed are both post-processing of the noisy mean. Every noisy mean counts as
a release (``report.released``), committed or vetoed: a veto's verdict depends on it.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

from layerfed.federation.aggregate import Reply, SlotOutcome, validate_and_aggregate
from layerfed.federation.round_context import RoundContext, RoundReport
from layerfed.federation.validate import ReplyChecks
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.privacy_accounting import noise_multiplier
from layerfed.governance.schema import LayerPolicy
from layerfed.layers.arrays import add_gaussian, clip_to_norm, noise_rng
from layerfed.layers.slots import SlotId

__all__ = ["clip_replies", "slot_outcome"]


def clip_replies(replies: Sequence[Reply], clip_norm: float) -> list[Reply]:
    """Each reply clipped to ``clip_norm`` and given weight 1 (non-float replies left for validation)."""
    out = []
    for reply in replies:
        floats = all(a.dtype.kind == "f" for a in reply.arrays.values())
        arrays = clip_to_norm(reply.arrays, clip_norm).arrays if floats else reply.arrays
        out.append(Reply(arrays, 1.0, reply.client_id))
    return out


def slot_outcome(
    ctx: RoundContext,
    slot: SlotId,
    replies: Sequence[Reply],
    layer: LayerPolicy,
    checks: ReplyChecks,
    report: RoundReport,
) -> SlotOutcome:
    """Validate and aggregate a slot's replies, under central DP when its layer asks for it."""
    privacy = layer.privacy
    if privacy is None or privacy.mode != "central_dp" or privacy.clip_norm is None:
        return validate_and_aggregate(
            replies, layer.aggregator, checks, min_clients=layer.min_clients
        )
    clipped = clip_replies(replies, privacy.clip_norm)
    outcome = validate_and_aggregate(
        clipped, layer.aggregator, checks, min_clients=layer.min_clients
    )
    if outcome.result is None:
        return outcome
    std = noise_multiplier(privacy) * privacy.clip_norm / len(outcome.result.used)
    rng = noise_rng(ctx.noise_seed, [ctx.round, zlib.crc32(str(slot).encode())])
    noisy = add_gaussian(outcome.result.arrays, std, rng)
    report.released.append(str(slot))
    ctx.audit.append(
        AuditKind.PRIVACY_NOISE,
        round=ctx.round,
        slot=str(slot),
        mode="central_dp",
        std=std,
        clip_norm=privacy.clip_norm,
        contributors=len(outcome.result.used),
    )
    return dataclasses.replace(outcome, result=dataclasses.replace(outcome.result, arrays=noisy))
