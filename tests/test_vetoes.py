"""The veto engine: each condition, each action, precedence and the probe baseline cache."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from numpy.typing import NDArray

from layerfed.federation.vetoes import ProbeBaselines, VetoDecision, check_slot
from layerfed.governance.patterns import matches_any
from layerfed.governance.schema import Policy, Principal, Veto
from layerfed.layers.arrays import global_norm

DEFAULT = Path(__file__).resolve().parents[1] / "examples" / "policies" / "default.yaml"
KEY = "ed25519:" + "A" * 43 + "="
SCOPES = {"community": ["h.*.mlp.c_fc.*"], "individual": ["h.1.mlp.c_proj.*"]}


def _policy(*vetoes: dict[str, Any]) -> Policy:
    policy = Policy.model_validate(yaml.safe_load(DEFAULT.read_text()))
    extra = [Principal(name=f"creator_{i}", layer="creator", public_key=KEY) for i in range(2)]
    return policy.model_copy(
        update={
            "vetoes": [Veto.model_validate(v) for v in vetoes],
            "principals": [*policy.principals, *extra],
        }
    )


def _veto(name: str, condition: dict[str, Any], action: str, **kw: Any) -> dict[str, Any]:
    base = {"name": name, "holder": "creator", "applies_to": ["community", "individual"]}
    return {**base, "condition": condition, "action": action, **kw}


def _in_scope(layer: str, name: str) -> bool:
    return matches_any(name, SCOPES.get(layer, []))


class Probes:
    """A real probe: violation rate = 0.1 + 0.1 * the candidate's norm; counts its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float | None]] = []

    def __call__(self, suite: str, candidate: Mapping[str, NDArray[Any]] | None) -> float:
        norm = None if candidate is None else global_norm(candidate)
        self.calls.append((suite, norm))
        return 0.1 if norm is None else 0.1 + 0.1 * norm


def _candidate(scale: float = 1.0, extra: bool = False) -> dict[str, NDArray[Any]]:
    arrays: dict[str, NDArray[Any]] = {
        "h.0.mlp.c_fc.lora_A": np.full((2, 2), 0.5 * scale, np.float32)
    }
    if extra:
        arrays["h.0.attn.c_attn.lora_A"] = np.ones(3, np.float32)
    return arrays


def _run(
    policy: Policy,
    candidate: dict[str, NDArray[Any]],
    layer: str = "community",
    approvals: set[str] | None = None,
    probe: Probes | None = None,
) -> VetoDecision:
    return check_slot(
        policy,
        layer,
        candidate,
        in_scope=_in_scope,
        probe=probe or Probes(),
        approvals=approvals or set(),
    )


def test_no_applicable_veto_accepts_unchanged() -> None:
    """With no veto naming the layer, the candidate is accepted as is."""
    policy = _policy(_veto("n", {"kind": "norm", "max_norm": 0.1}, "reject", applies_to=["x"]))
    cand = _candidate()
    d = _run(policy, cand)
    assert d.action == "accept" and d.commit and d.hits == ()
    assert d.arrays["h.0.mlp.c_fc.lora_A"] is cand["h.0.mlp.c_fc.lora_A"]


def test_scope_reject_and_scope_clip() -> None:
    """A scope veto fires on arrays outside the layer's scope; clip zeroes just those."""
    d = _run(_policy(_veto("s", {"kind": "scope"}, "reject")), _candidate(extra=True))
    assert d.action == "reject" and not d.commit
    assert d.hits[0].veto_name == "s" and "h.0.attn.c_attn.lora_A" in d.hits[0].reason
    d = _run(_policy(_veto("s", {"kind": "scope"}, "clip")), _candidate(extra=True))
    assert d.action == "clip" and d.commit
    assert not d.arrays["h.0.attn.c_attn.lora_A"].any()
    np.testing.assert_array_equal(
        d.arrays["h.0.mlp.c_fc.lora_A"], _candidate()["h.0.mlp.c_fc.lora_A"]
    )
    assert _run(_policy(_veto("s", {"kind": "scope"}, "reject")), _candidate()).action == "accept"


@pytest.mark.parametrize("action", ["reject", "hold", "clip"])
def test_norm_condition_with_each_action(action: str) -> None:
    """A norm veto fires above max_norm; clip scales to max_norm, others keep the arrays."""
    policy = _policy(_veto("n", {"kind": "norm", "max_norm": 0.5}, action))
    d = _run(policy, _candidate())  # norm 1.0
    assert d.action == action and d.hits[0].holder == "creator"
    assert "expected at most 0.5, got 1" in d.hits[0].reason
    want = 0.5 if action == "clip" else 1.0
    assert global_norm(d.arrays) == pytest.approx(want, rel=1e-6)
    assert _run(policy, _candidate(scale=0.5)).action == "accept"


def test_probe_regression_fires_only_above_the_allowed_regression() -> None:
    """probe(candidate) - probe(current) > max_regression fires; equal to it does not."""
    cond = {"kind": "probe_regression", "suite": "red_line_refusals", "max_regression": 0.1}
    policy = _policy(_veto("p", cond, "reject"))
    d = _run(policy, _candidate(scale=1.5))  # regression 0.15
    assert d.action == "reject" and "red_line_refusals" in d.hits[0].reason
    assert _run(policy, _candidate(scale=0.5)).action == "accept"  # regression 0.05


def test_probe_baseline_is_measured_once_per_suite() -> None:
    """Two probe vetoes on one suite measure the committed state once; a shared cache spans slots."""
    cond = {"kind": "probe_regression", "suite": "near_misses", "max_regression": 1.0}
    policy = _policy(_veto("p1", cond, "reject"), _veto("p2", cond, "hold"))
    probes = Probes()
    _run(policy, _candidate(), probe=probes)
    assert [c for c in probes.calls if c[1] is None] == [("near_misses", None)]
    shared, calls = ProbeBaselines(Probes()), Probes()
    for layer in ("community", "individual"):
        check_slot(
            policy,
            layer,
            _candidate(),
            in_scope=_in_scope,
            probe=calls,
            approvals=set(),
            baselines=shared,
        )
    assert all(norm is not None for _, norm in calls.calls)


def test_probe_sees_the_clipped_candidate() -> None:
    """Probes measure the update after norm clipping, i.e. what would be committed."""
    cond = {"kind": "probe_regression", "suite": "near_misses", "max_regression": 0.06}
    policy = _policy(
        _veto("n", {"kind": "norm", "max_norm": 0.5}, "clip"), _veto("p", cond, "reject")
    )
    probes = Probes()
    d = _run(policy, _candidate(), probe=probes)
    assert d.action == "clip" and probes.calls[-1][1] == pytest.approx(0.5, rel=1e-6)


def test_probe_clip_holds_and_nan_fails_closed() -> None:
    """A clip cannot repair a probe regression (it holds); a nan probe result fires."""
    cond = {"kind": "probe_regression", "suite": "near_misses", "max_regression": 0.0}
    d = _run(_policy(_veto("p", cond, "clip")), _candidate())
    assert d.action == "hold" and d.hits[0].action == "hold"
    nan = check_slot(
        _policy(_veto("p", cond, "reject")),
        "community",
        _candidate(scale=0.0),
        in_scope=_in_scope,
        probe=lambda suite, cand: float("nan"),
        approvals=set(),
    )
    assert nan.action == "reject" and "finite" in nan.hits[0].reason


def test_quorum_counts_only_the_holder_layers_principals() -> None:
    """Quorum fires unless min_signatures principals of the holder layer approved."""
    policy = _policy(_veto("q", {"kind": "quorum", "min_signatures": 2}, "hold"))
    d = _run(policy, _candidate(), approvals={"creator_root", "government_eu"})
    assert d.action == "hold" and "expected at least 2, got 1" in d.hits[0].reason
    ok = _run(policy, _candidate(), approvals={"creator_root", "creator_1"})
    assert ok.action == "accept"
    reject = _policy(_veto("q", {"kind": "quorum", "min_signatures": 1}, "reject"))
    assert _run(reject, _candidate()).action == "reject"


def test_precedence_reject_beats_hold_beats_clip() -> None:
    """The decision is the strongest action hit, and every hit is listed."""
    clip = _veto("c", {"kind": "norm", "max_norm": 0.5}, "clip")
    hold = _veto("h", {"kind": "quorum", "min_signatures": 1}, "hold")
    reject = _veto("r", {"kind": "scope"}, "reject")
    cand = _candidate(extra=True)
    assert _run(_policy(clip), cand).action == "clip"
    assert _run(_policy(clip, hold), cand).action == "hold"
    d = _run(_policy(reject, clip, hold), cand)
    assert d.action == "reject" and [h.veto_name for h in d.hits] == ["r", "c", "h"]


def test_probes_are_skipped_once_rejected() -> None:
    """A probe veto is not run when a cheaper veto already rejected the update."""
    cond = {"kind": "probe_regression", "suite": "near_misses", "max_regression": 0.0}
    policy = _policy(_veto("p", cond, "reject"), _veto("s", {"kind": "scope"}, "reject"))
    probes = Probes()
    d = _run(policy, _candidate(extra=True), probe=probes)
    assert d.action == "reject" and [h.veto_name for h in d.hits] == ["s"] and probes.calls == []


def test_default_policy_vetoes_on_a_bad_individual_update() -> None:
    """The shipped policy rejects an out-of-scope individual update and clips a large one."""
    policy = Policy.model_validate(yaml.safe_load(DEFAULT.read_text()))
    flat = lambda suite, cand: 0.0  # noqa: E731
    big = {"h.1.mlp.c_proj.lora_B": np.full(4, 10.0, np.float32)}
    d = check_slot(policy, "individual", big, in_scope=_in_scope, probe=flat, approvals=set())
    assert d.action == "clip" and global_norm(d.arrays) == pytest.approx(5.0, rel=1e-6)
    bad = {**big, "h.0.attn.c_attn.lora_A": np.ones(2, np.float32)}
    d = check_slot(policy, "individual", bad, in_scope=_in_scope, probe=flat, approvals=set())
    assert d.action == "reject" and d.hits[0].veto_name == "creator_scope"
