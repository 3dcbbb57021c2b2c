"""Privacy rules of a policy: combinations that cannot hold are refused, and why.

Wired into :data:`layerfed.governance.semantics.RULES` as :func:`privacy_rule`.
Secure aggregation shows the server only a slot's sum, so anything that must see
one reply refuses it: robust aggregators (median, trimmed mean and Krum order or
compare individual replies), a layer ``norm_cap`` (refuses a reply by its norm)
and a ``clip`` norm veto (scales each reply before aggregation). DP noise calibrated
to one person's influence needs that influence bounded (``clip_norm``) and, on
the server, a sum (FedAvg). A probe veto whose threshold the noise alone would
trip is refused: see :func:`_probe_noise`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Protocol

from layerfed.governance.issues import Issue
from layerfed.governance.probe_files import check_probe_file, suite_file
from layerfed.governance.schema import (
    LayerPolicy,
    NormCondition,
    Policy,
    ProbeRegressionCondition,
)

__all__ = [
    "MIN_SECURE_COHORT",
    "noise_to_signal",
    "privacy_issues",
    "privacy_loosened",
    "privacy_rule",
]

MIN_SECURE_COHORT = 3
"""Fewest contributors a secure sum may have: with two, each learns the other's update."""


class _HasPolicy(Protocol):
    @property
    def policy(self) -> Policy: ...


def privacy_rule(ctx: _HasPolicy) -> Iterator[Issue]:
    """The semantic rule: every privacy issue of ``ctx.policy``."""
    for path, message, severity in privacy_issues(ctx.policy):
        yield Issue(path, message, severity)


Found = tuple[tuple[str | int, ...], str, str]


def privacy_issues(policy: Policy) -> Iterator[Found]:
    """``(path, message, severity)`` for every privacy rule ``policy`` breaks."""
    for i, layer in enumerate(policy.layers):
        privacy = layer.privacy
        if privacy is None or privacy.mode == "none":
            if privacy is not None and (privacy.epsilon_budget or privacy.secagg):
                yield (
                    ("layers", i, "privacy"),
                    "expected no budget or secagg for mode none",
                    "error",
                )
            continue
        path = ("layers", i, "privacy")
        if privacy.mode == "secure_aggregation":
            yield from _secure(policy, layer, path)
        else:
            yield from _dp(policy, layer, path)


def _secure(policy: Policy, layer: LayerPolicy, path: tuple[str | int, ...]) -> Iterator[Found]:
    privacy = layer.privacy
    assert privacy is not None
    why = "the server sees only the slot's sum under secure aggregation"
    if layer.aggregator.kind != "fedavg":
        msg = f"expected aggregator fedavg with secure aggregation, got {layer.aggregator.kind} ({why}; {layer.aggregator.kind} needs each reply)"
        yield ("layers", path[1], "aggregator", "kind"), msg, "error"
    if layer.norm_cap is not None:
        msg = (
            f"expected no norm_cap with secure aggregation, got {layer.norm_cap:g} ({why}, so it cannot refuse "
            "one reply by its norm; set privacy.clip_norm (clients clip before masking) and a norm veto on the aggregate)"
        )
        yield ("layers", path[1], "norm_cap"), msg, "error"
    for k, veto in enumerate(policy.vetoes):
        if (
            layer.name in veto.applies_to
            and veto.action == "clip"
            and isinstance(veto.condition, NormCondition)
        ):
            msg = f"expected reject or hold for norm veto '{veto.name}' on secure layer '{layer.name}', got 'clip' (a clip veto scales each reply; {why})"
            yield ("vetoes", k, "action"), msg, "error"
    if not layer.updates_leave_instance:
        msg = "expected updates_leave_instance: true with secure aggregation, got false (nothing is aggregated)"
        yield (*path, "mode"), msg, "error"
    if layer.min_clients < MIN_SECURE_COHORT:
        msg = f"expected min_clients >= {MIN_SECURE_COHORT} with secure aggregation, got {layer.min_clients} (with two contributors each learns the other's update from the sum)"
        yield ("layers", path[1], "min_clients"), msg, "error"
    for name in ("noise_multiplier", "target_epsilon", "epsilon_budget"):
        if getattr(privacy, name) is not None:
            msg = f"expected no {name} with secure aggregation, got one (it adds no noise; use central_dp or local_dp)"
            yield (*path, name), msg, "error"
    secagg = privacy.secagg
    if secagg is not None and secagg.max_dropout_fraction > 1 - secagg.threshold + 1e-12:
        msg = (
            f"expected max_dropout_fraction <= 1 - threshold = {1 - secagg.threshold:g}, got "
            f"{secagg.max_dropout_fraction:g} (fewer survivors than the threshold cannot unmask the sum)"
        )
        yield (*path, "secagg", "max_dropout_fraction"), msg, "error"


def _dp(policy: Policy, layer: LayerPolicy, path: tuple[str | int, ...]) -> Iterator[Found]:
    privacy = layer.privacy
    assert privacy is not None
    if privacy.clip_norm is None:
        msg = f"expected clip_norm for {privacy.mode} (the noise is calibrated to one person's clipped update), got none"
        yield (*path, "clip_norm"), msg, "error"
    given = privacy.noise_multiplier is not None
    target = privacy.target_epsilon is not None
    if given == target:
        msg = (
            "expected exactly one of noise_multiplier or target_epsilon (with target_rounds), got "
        )
        msg += "both" if given else "neither"
        yield (*path, "noise_multiplier"), msg, "error"
    if target and privacy.target_rounds is None:
        msg = "expected target_rounds (the releases target_epsilon must cover), got none"
        yield (*path, "target_rounds"), msg, "error"
    if privacy.secagg is not None:
        yield (*path, "secagg"), f"expected no secagg block for {privacy.mode}, got one", "error"
    if privacy.mode == "central_dp":
        if not layer.updates_leave_instance:
            msg = "expected local_dp for a layer whose updates never leave the instance, got central_dp (the server never sees them)"
            yield (*path, "mode"), msg, "error"
        if layer.aggregator.kind != "fedavg":
            msg = (
                f"expected aggregator fedavg with central_dp, got {layer.aggregator.kind} (the noise is "
                "calibrated to a sum, which one clipped reply moves by at most clip_norm; "
                f"{layer.aggregator.kind} has another sensitivity)"
            )
            yield ("layers", path[1], "aggregator", "kind"), msg, "error"
    target_e, budget = privacy.target_epsilon, privacy.epsilon_budget
    if target_e is not None and budget is not None and budget < target_e:
        msg = f"expected epsilon_budget >= target_epsilon {target_e:g}, got {budget:g}"
        yield (*path, "epsilon_budget"), msg, "warning"
    if privacy.delta > 1e-3:
        msg = f"expected delta <= 1e-3 (delta is a chance of total failure), got {privacy.delta:g}"
        yield (*path, "delta"), msg, "warning"
    if layer.updates_leave_instance:
        yield from _probe_noise(policy, layer)


def noise_to_signal(layer: LayerPolicy, multiplier: float) -> float:
    """Noise std per coordinate over the largest signal per coordinate, for the smallest cohort.

    A clipped mean moves a slot by at most ``clip_norm`` in L2; the noise adds
    ``z * clip_norm / n`` (central: noise on the sum of ``n``) or
    ``z * clip_norm / sqrt(n)`` (local: ``n`` independent noises averaged) to every
    coordinate. ``n`` is ``min_clients``, the smallest cohort a commit may have.
    """
    n = max(1, layer.min_clients)
    assert layer.privacy is not None
    return multiplier / n if layer.privacy.mode == "central_dp" else multiplier / math.sqrt(n)


def _suite_size(policy: Policy, name: str) -> int | None:
    for suite in policy.probe_suites:
        if suite.name == name and suite.builtin is None:
            file = suite_file(suite, policy.source_dir)
            if file.is_file():
                prompts, errors = check_probe_file(file)
                return len(prompts) if prompts and not errors else None
    return None


def _probe_noise(policy: Policy, layer: LayerPolicy) -> Iterator[Found]:
    """Refuse probe vetoes that the noise alone would trip.

    The noise is zero-mean and independent of the update, so it moves each probe
    the wrong way as often as the right way: it worsens at least one probe in
    about half the rounds. A ``max_regression`` of 0, or below one probe of the
    suite (``1/N`` for a JSONL suite of ``N`` prompts), then rejects about every
    other round whatever the members send: refused. When the noise per coordinate
    exceeds the largest signal (:func:`noise_to_signal` > 1) the noise decides
    what the probes see: a warning. Conservative: it assumes the noise reaches a
    probe's decision boundary, which it does for large enough noise.
    """
    from layerfed.governance.privacy_accounting import noise_multiplier

    assert layer.privacy is not None
    try:
        z = noise_multiplier(layer.privacy)
    except Exception:  # a bad target is reported by the other rules
        return
    if z <= 0:
        return
    ratio = noise_to_signal(layer, z)
    for k, veto in enumerate(policy.vetoes):
        cond = veto.condition
        if layer.name not in veto.applies_to or not isinstance(cond, ProbeRegressionCondition):
            continue
        size = _suite_size(policy, cond.suite)
        one = 1.0 / size if size else 0.0
        where = ("vetoes", k, "condition", "max_regression")
        if cond.max_regression <= 0 or cond.max_regression < one:
            unit = f" (one probe of {size} is {one:.3g})" if size else ""
            msg = (
                f"expected a max_regression of at least one probe for DP layer '{layer.name}', got "
                f"{cond.max_regression:g}{unit}: zero-mean noise worsens some probe in about half the rounds, "
                "so the noise alone would trip this veto"
            )
            yield where, msg, "error"
        elif ratio > 1:
            msg = (
                f"noise per coordinate is {ratio:.3g}x the largest signal on '{layer.name}' "
                f"(z={z:.3g}, min_clients={layer.min_clients}): probe '{cond.suite}' will mostly see the noise, "
                f"and may reject rounds with regressions above {cond.max_regression:g} that no member caused"
            )
            yield where, msg, "warning"


_DP = ("central_dp", "local_dp")


def privacy_loosened(leaf: str, old: Any, new: Any) -> str:
    """Why changing a layer's ``privacy.<leaf>`` from ``old`` to ``new`` loosens it, or "".

    For ``policy diff``. The ledger prices spent releases at the parameters they ran
    with, so more noise re-prices nothing and is no loosening. What would re-price
    spent privacy downward, or spend more of it, is: leaving DP (``mode`` from a DP
    mode to anything else; a switch between DP modes keeps the releases, but is
    flagged as the guarantee changes), a larger ``delta`` (ε(δ) of the same releases
    falls), a larger or removed ``epsilon_budget``, less noise (``noise_multiplier``
    lowered, ``target_epsilon`` raised, ``target_rounds`` lowered).
    """
    num = isinstance(old, int | float) and isinstance(new, int | float)
    if leaf == "mode" and old in _DP and new != old:
        return f"privacy mode {old} -> {new}: spent releases would be re-priced"
    if leaf == "delta" and num and new > old:
        return "privacy delta raised: the epsilon of spent releases would be re-priced lower"
    if leaf == "epsilon_budget" and old is not None and (new is None or (num and new > old)):
        return "privacy budget raised" if new is not None else "privacy budget removed"
    if leaf == "noise_multiplier" and num and new < old:
        return "privacy noise lowered: each release spends more"
    if leaf == "target_epsilon" and num and new > old:
        return "privacy target epsilon raised: each release spends more"
    if leaf == "target_rounds" and num and new < old:
        return "privacy target rounds lowered: each release spends more"
    return ""
