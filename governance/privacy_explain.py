"""A layer's privacy in words for ``policy explain``: mode, parameters, ε after some rounds, budget."""

from __future__ import annotations

import math

from layerfed.governance.privacy_accounting import (
    DP_MODES,
    layer_epsilon,
    noise_multiplier,
    releases_within,
)
from layerfed.governance.schema import LayerPolicy, SecureAggregation

__all__ = ["privacy_lines"]

_WHAT = {
    "central_dp": "central DP: the server clips each reply and noises the slot's sum",
    "local_dp": "local DP: each instance clips and noises its update before signing",
    "secure_aggregation": "secure aggregation (SecAgg+): the server learns only each slot's sum",
}


def _eps(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"


def privacy_lines(layer: LayerPolicy) -> list[str]:
    """Lines describing ``layer``'s privacy (``["none"]`` when it has none)."""
    privacy = layer.privacy
    if privacy is None or privacy.mode == "none":
        return ["none (the server sees every update)" if layer.updates_leave_instance else "none"]
    lines = [_WHAT[privacy.mode]]
    if privacy.mode == "secure_aggregation":
        sa = privacy.secagg or SecureAggregation()
        lines.append(
            f"unmask threshold {sa.threshold:g} of a cohort, up to {sa.max_dropout_fraction:g} may drop; "
            f"coordinates clipped to +-{sa.clip_range:g}, {sa.quantization_bits}-bit quantisation"
        )
        if privacy.clip_norm is not None:
            lines.append(f"clients clip to L2 norm {privacy.clip_norm:g} before masking")
        return lines
    assert privacy.mode in DP_MODES
    z = noise_multiplier(privacy)
    how = (
        f"given {z:g}"
        if privacy.noise_multiplier is not None
        else (
            f"{z:.3g}, calibrated to epsilon {privacy.target_epsilon:g} after {privacy.target_rounds} releases"
        )
    )
    clip = "unset" if privacy.clip_norm is None else f"{privacy.clip_norm:g}"
    lines.append(f"clip norm {clip}, noise multiplier {how}, delta {privacy.delta:g}")
    points = ", ".join(f"{k}: {_eps(layer_epsilon(privacy, k))}" for k in (1, 10, 100))
    lines.append(f"epsilon after releases (no subsampling claimed) {points}")
    if privacy.epsilon_budget is None:
        lines.append("no epsilon budget: training never stops for privacy")
    else:
        most = releases_within(privacy, privacy.epsilon_budget)
        unit = "per slot" if privacy.mode == "central_dp" else "per instance and slot"
        lines.append(
            f"budget epsilon {privacy.epsilon_budget:g} {unit}: at most {most} releases, then the slot stops training"
        )
    return lines
