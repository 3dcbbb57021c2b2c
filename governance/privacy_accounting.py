"""Differential-privacy accounting through Google's ``dp-accounting`` (no hand-written bounds).

Every release of a slot under a DP mode is one Gaussian mechanism with the layer's
noise multiplier ``z`` (noise std / clip norm) on data whose one-person sensitivity
is the clip norm. No amplification by subsampling is claimed: layerfed samples a
fixed number of instances per layer and then a group per instance, which is not the
Poisson sampling the amplification theorems assume, so each release counts in full
for every person who could have contributed (sampling rate 1). ε(δ) after ``k``
releases is the RDP accountant's value for ``k`` self-composed Gaussian mechanisms.

A slot's spent privacy is priced by the releases that happened, never by today's
policy: the ledger records each release's parameters (:class:`Release`) and
:func:`composed_epsilon` composes them (``ComposedDpEvent`` of one
``SelfComposedDpEvent`` per distinct parameter set), so a successor policy with
more noise prices only the releases still to come.

``dp_accounting`` (and the scipy it loads) is imported on first use only: policy
commands that never ask for ε stay fast.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from layerfed.governance.schema import Privacy

__all__ = [
    "DP_MODES",
    "Release",
    "composed_epsilon",
    "current_release",
    "epsilon",
    "layer_epsilon",
    "noise_multiplier",
    "releases_within",
]

DP_MODES = ("central_dp", "local_dp")
"""Modes that add noise and spend a budget."""


def _accounting() -> Any:
    import dp_accounting

    return dp_accounting


@lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """ε(δ) of ``releases`` Gaussian mechanisms with ``noise_multiplier`` (RDP accountant).

    0 releases spend nothing; a zero multiplier is no privacy at all (infinity).
    """
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    dp = _accounting()
    accountant = dp.rdp.RdpAccountant()
    accountant.compose(dp.GaussianDpEvent(noise_multiplier), releases)
    return float(accountant.get_epsilon(delta))


@lru_cache(maxsize=256)
def _calibrated(target_epsilon: float, rounds: int, delta: float) -> float:
    dp = _accounting()

    def event(z: float) -> Any:
        return dp.SelfComposedDpEvent(dp.GaussianDpEvent(z), rounds)

    z = dp.calibrate_dp_mechanism(
        dp.rdp.RdpAccountant,
        event,
        target_epsilon,
        delta,
        dp.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-4,
    )
    return float(z)


def noise_multiplier(privacy: Privacy) -> float:
    """The layer's noise multiplier: given, or calibrated to ``target_epsilon`` after ``target_rounds``.

    Calibration returns the smallest ``z`` (within 1e-4) whose ε after
    ``target_rounds`` releases is at most ``target_epsilon``.
    """
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    if privacy.target_epsilon is None:
        return 0.0
    return _calibrated(privacy.target_epsilon, privacy.target_rounds or 1, privacy.delta)


def layer_epsilon(privacy: Privacy, releases: int) -> float:
    """ε(δ) of a slot (or instance) of a DP layer after ``releases`` releases."""
    return epsilon(noise_multiplier(privacy), releases, privacy.delta)


def releases_within(privacy: Privacy, budget: float, most: int = 100_000) -> int:
    """How many releases keep ε(δ) within ``budget`` (at most ``most``)."""
    lo, hi = 0, most
    if layer_epsilon(privacy, hi) <= budget:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if layer_epsilon(privacy, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True, order=True)
class Release:
    """The parameters one DP release actually ran with (what the ledger records)."""

    noise_multiplier: float
    sampling_rate: float = 1.0
    """Poisson sampling rate of the release (1: no amplification claimed)."""
    clip_norm: float = 0.0
    """The L2 clip norm (recorded; ε depends only on the multiplier and rate)."""

    def to_json(self, steps: int) -> dict[str, float | int]:
        """As the checkpointed ledger holds it, with its number of ``steps``."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "clip_norm": self.clip_norm,
            "steps": steps,
        }

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> tuple[Release, int]:
        """Read one ledger entry back; ValueError naming the field when malformed."""
        try:
            release = cls(
                float(item["noise_multiplier"]),
                float(item.get("sampling_rate", 1.0)),
                float(item.get("clip_norm", 0.0)),
            )
            steps = int(item["steps"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"privacy ledger entry: expected noise_multiplier and steps, got {e}"
            ) from e
        if not (release.noise_multiplier >= 0 and 0 < release.sampling_rate <= 1 and steps >= 0):
            raise ValueError(f"privacy ledger entry: expected z >= 0, 0 < q <= 1, got {item}")
        return release, steps


def current_release(privacy: Privacy) -> Release:
    """The parameters a release under ``privacy`` runs with now."""
    return Release(noise_multiplier(privacy), 1.0, float(privacy.clip_norm or 0.0))


def composed_epsilon(releases: Iterable[tuple[Release, int]], delta: float) -> float:
    """ε(δ) of every release that happened: each parameter set's steps, composed (RDP).

    0 steps spend nothing; any step with a zero multiplier is no privacy (infinity).
    """
    merged: dict[Release, int] = {}
    for release, steps in releases:
        if steps > 0:
            merged[release] = merged.get(release, 0) + steps
    return _composed(tuple(sorted(merged.items())), delta)


@lru_cache(maxsize=4096)
def _composed(releases: tuple[tuple[Release, int], ...], delta: float) -> float:
    if not releases:
        return 0.0
    if any(r.noise_multiplier <= 0 for r, _ in releases):
        return math.inf
    dp = _accounting()
    events = []
    for release, steps in releases:
        gaussian = dp.GaussianDpEvent(release.noise_multiplier)
        mechanism = (
            gaussian
            if release.sampling_rate >= 1.0
            else dp.PoissonSampledDpEvent(release.sampling_rate, gaussian)
        )
        events.append(dp.SelfComposedDpEvent(mechanism, steps))
    accountant = dp.rdp.RdpAccountant()
    accountant.compose(dp.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))
