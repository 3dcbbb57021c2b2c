"""Differential privacy: clipping, noise statistics, the accountant against dp-accounting, budgets."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from layerfed.clients.local_dp import privatise
from layerfed.federation.aggregate import Reply
from layerfed.federation.privacy import central_dp, clip_replies, validating
from layerfed.federation.validate import ReplyChecks
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.loader import load_policy
from layerfed.governance.privacy_accounting import (
    epsilon,
    layer_epsilon,
    noise_multiplier,
    releases_within,
)
from layerfed.governance.schema import LayerPolicy, Privacy
from layerfed.layers.arrays import add_gaussian, clip_to_norm, noise_rng
from layerfed.layers.arrays import global_norm as l2_norm
from layerfed.layers.slots import SlotId
from tests.policy_helpers import EXAMPLES

SHAPE = (64, 8)


def _layer(privacy: Privacy, min_clients: int = 1) -> LayerPolicy:
    base = load_policy(EXAMPLES / "default.yaml").layer("community")
    return base.model_copy(
        update={
            "privacy": privacy,
            "aggregator": base.aggregator.model_copy(update={"kind": "fedavg"}),
            "min_clients": min_clients,
            "norm_cap": None,
        }
    )


@settings(max_examples=60, deadline=None)
@given(
    arrays=hnp.arrays(np.float32, st.integers(1, 40), elements=st.floats(-1e3, 1e3, width=32)),
    clip=st.floats(0.01, 100),
)
def test_clip_bounds_norm_and_keeps_direction(arrays: np.ndarray, clip: float) -> None:
    """Clipping leaves the norm at most the clip (float32 rounding aside) and the direction unchanged."""
    out = clip_to_norm({"a": arrays}, clip).arrays["a"]
    norm = l2_norm({"a": arrays})
    assert l2_norm({"a": out}) <= clip * (1 + 1e-5) + 1e-30
    if norm <= clip:
        assert np.array_equal(out, arrays)
    else:
        np.testing.assert_allclose(out * (norm / clip), arrays, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("std", [0.01, 0.5, 3.0])
def test_gaussian_noise_matches_its_parameters(std: float) -> None:
    """Added noise is N(0, std^2): KS test against the normal, mean and variance within 4 sigma."""
    base = {"b": np.zeros(20_000, dtype=np.float64)}
    noise = add_gaussian(base, std, noise_rng(1234))["b"]
    assert stats.kstest(noise / std, "norm").pvalue > 1e-3
    assert abs(noise.mean()) < 4 * std / math.sqrt(noise.size)
    assert abs(noise.var() / std**2 - 1) < 4 * math.sqrt(2 / noise.size)


def test_local_dp_clips_then_adds_z_times_clip() -> None:
    """Local DP: the delta is clipped to clip_norm, then N(0, (z*clip)^2) is added to every coordinate."""
    privacy = Privacy(mode="local_dp", clip_norm=0.5, noise_multiplier=1.3)
    layer = _layer(privacy)
    delta = {"x": np.full(SHAPE, 0.2, dtype=np.float32), "y": np.ones(SHAPE, dtype=np.float32)}
    out = privatise(delta, layer, SlotId("community", "global"), 3, seed=7)
    clipped = clip_to_norm(delta, 0.5).arrays
    noise = np.concatenate([(out[k].astype(np.float64) - clipped[k]).ravel() for k in sorted(out)])
    assert stats.kstest(noise / (1.3 * 0.5), "norm").pvalue > 1e-3
    assert (
        privatise(delta, layer, SlotId("community", "global"), 3, seed=7)["x"].tobytes()
        == out["x"].tobytes()
    )
    none = _layer(Privacy(mode="none"))
    assert privatise(delta, none, SlotId("community", "global"), 3, seed=7) is delta


def test_central_dp_noise_on_the_mean_is_z_clip_over_n() -> None:
    """Central DP: replies clipped and equally weighted; the mean gets N(0, (z*clip/n)^2)."""
    z, clip, n = 2.0, 1.0, 5
    layer = _layer(Privacy(mode="central_dp", clip_norm=clip, noise_multiplier=z))
    rng = np.random.default_rng(0)
    replies = [
        Reply({"w": rng.normal(0, 1, SHAPE).astype(np.float32)}, float(10 + i), f"c{i}")
        for i in range(n)
    ]
    checks = ReplyChecks(
        expected={"w": (SHAPE, np.float32)},
        in_scope=lambda name: True,
        redline=lambda name: False,
        norm_cap=None,
        clip=False,
        max_bytes=10**9,
    )
    privacy = layer.privacy
    assert privacy is not None
    slot = SlotId("community", "global")
    aggregation = central_dp(
        validating(layer, checks), privacy, round_=1, slot=slot, noise_seed=99
    )(replies)
    outcome = aggregation.outcome
    noise_events = [e for e in aggregation.events if e.kind == AuditKind.PRIVACY_NOISE]
    assert aggregation.released and len(noise_events) == 1
    assert noise_events[0].as_fields()["std"] == z * clip / n
    assert outcome.result is not None
    clipped = clip_replies(replies, clip)
    assert all(r.weight == 1.0 and l2_norm(r.arrays) <= clip * (1 + 1e-6) for r in clipped)
    mean = np.mean([r.arrays["w"].astype(np.float64) for r in clipped], axis=0)
    noise = outcome.result.arrays["w"].astype(np.float64) - mean
    assert stats.kstest((noise / (z * clip / n)).ravel(), "norm").pvalue > 1e-3


@pytest.mark.parametrize(("z", "k", "delta"), [(0.8, 1, 1e-5), (1.1, 30, 1e-6), (4.0, 500, 1e-5)])
def test_accountant_equals_the_library(z: float, k: int, delta: float) -> None:
    """ε after k releases is exactly dp-accounting's RDP value for k composed Gaussian mechanisms."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), k))
    assert epsilon(z, k, delta) == pytest.approx(accountant.get_epsilon(delta), rel=1e-12)
    assert epsilon(z, 0, delta) == 0.0 and math.isinf(epsilon(0.0, k, delta))


def test_calibration_reaches_the_target_and_budget_counts_releases() -> None:
    """A target ε after T releases calibrates z so ε(T) <= target (within tolerance); budgets cut releases."""
    privacy = Privacy(mode="local_dp", clip_norm=1.0, target_epsilon=4.0, target_rounds=20)
    z = noise_multiplier(privacy)
    assert layer_epsilon(privacy, 20) == pytest.approx(4.0, rel=2e-3)
    assert epsilon(z * 0.98, 20, privacy.delta) > 4.0
    most = releases_within(privacy, 4.0 * 1.01)
    assert layer_epsilon(privacy, most) <= 4.04 < layer_epsilon(privacy, most + 1)
