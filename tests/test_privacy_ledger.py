"""The DP ledger prices the releases that happened: a successor policy never re-prices spent ε."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import pytest

from layerfed.federation.privacy_ledger import PrivacyLedger
from layerfed.federation.server_state import ServerState
from layerfed.governance.audit import AuditLog
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.canonical import policy_bytes
from layerfed.governance.diff import diff_policies
from layerfed.governance.loader import load_policy
from layerfed.governance.schema import Policy, Privacy
from layerfed.layers.slots import SlotId
from tests.policy_helpers import EXAMPLES

SLOT = SlotId("community", "global")
BUDGET = 14.0
DELTA = 1e-5


def _policy(z: float, mode: str = "central_dp") -> Policy:
    """The default policy with the community layer under DP with multiplier ``z``, budget 14."""
    base = load_policy(EXAMPLES / "default.yaml")
    privacy = Privacy(
        mode=mode, clip_norm=1.0, noise_multiplier=z, delta=DELTA, epsilon_budget=BUDGET
    )
    layers = [
        layer.model_copy(update={"privacy": privacy}) if layer.name == SLOT.layer else layer
        for layer in base.layers
    ]
    return base.model_copy(update={"layers": layers})


def _true_epsilon(steps: list[tuple[float, int]]) -> float:
    """ε of the releases that happened, composed by dp-accounting directly."""
    accountant = dp_accounting.rdp.RdpAccountant()
    for z, k in steps:
        accountant.compose(dp_accounting.GaussianDpEvent(z), k)
    return float(accountant.get_epsilon(DELTA))


def _train(
    ledger: PrivacyLedger, state: ServerState, audit: AuditLog, first: int, most: int
) -> int:
    """Run rounds (checkpointing each) until the ledger refuses the slot; return releases made."""
    made = 0
    for round_ in range(first, first + most):
        if not ledger.allows(SLOT, "inst-1", round_, audit):
            break
        closed = ledger.finish_round(round_, [str(SLOT)], [SLOT])
        state.metrics.append({"round": round_, "privacy": closed.summary})
        made += 1
    return made


def test_resume_under_more_noise_never_lowers_epsilon_and_stops_at_budget(tmp_path: Path) -> None:
    """z 0.6 -> 3.0 on resume: ε never falls, and the slot stops before the true ε passes 14."""
    audit = AuditLog(tmp_path / "audit.jsonl")
    state = ServerState(tmp_path, _policy(0.6), "run")
    first = _train(PrivacyLedger(_policy(0.6), state), state, audit, 1, 8)
    assert first == 2  # ε 13.13 after two releases at z 0.6; a third would pass 14
    before = PrivacyLedger(_policy(0.6), state).epsilon(SLOT)
    assert before == pytest.approx(_true_epsilon([(0.6, 2)]))
    resumed = PrivacyLedger(_policy(3.0), state)
    assert resumed.epsilon(SLOT) == before  # the resume re-prices nothing
    seen = [before]
    more = 0
    for round_ in range(9, 60):
        if not resumed.allows(SLOT, "inst-1", round_, audit):
            break
        resumed.finish_round(round_, [str(SLOT)], [SLOT])
        more += 1
        seen.append(resumed.epsilon(SLOT))
    assert seen == sorted(seen)
    truth = _true_epsilon([(0.6, 2), (3.0, more)])
    assert resumed.epsilon(SLOT) == pytest.approx(truth)
    assert truth <= BUDGET < _true_epsilon([(0.6, 2), (3.0, more + 1)])
    lines = (tmp_path / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    assert any(json.loads(line)["kind"] == AuditKind.PRIVACY_BUDGET_EXHAUSTED for line in lines)


def test_the_ledger_records_each_release_parameters_in_the_checkpoint(tmp_path: Path) -> None:
    """The checkpointed ledger names each parameter set's noise, sampling rate, clip and steps."""
    audit = AuditLog(tmp_path / "audit.jsonl")
    state = ServerState(tmp_path, _policy(0.6), "run")
    assert _train(PrivacyLedger(_policy(0.6), state), state, audit, 1, 2) == 2
    assert _train(PrivacyLedger(_policy(3.0), state), state, audit, 3, 3) == 3
    events = state.metrics[-1]["privacy"]["ledger"]["events"]["central"][str(SLOT)]
    assert events == [
        {"noise_multiplier": 0.6, "sampling_rate": 1.0, "clip_norm": 1.0, "steps": 2},
        {"noise_multiplier": 3.0, "sampling_rate": 1.0, "clip_norm": 1.0, "steps": 3},
    ]


def test_a_count_only_checkpoint_is_priced_at_the_least_noise_known(tmp_path: Path) -> None:
    """Old ledgers (counts only) are priced at the smallest z of the current or any pinned policy."""
    state = ServerState(tmp_path, _policy(3.0), "run")
    folder = state.root / "policies"
    folder.mkdir(parents=True)
    (folder / "old.json").write_bytes(policy_bytes(_policy(0.6)))
    state.metrics.append({"privacy": {"ledger": {"central": {str(SLOT): 2}, "local": {}}}})
    ledger = PrivacyLedger(_policy(3.0), state)
    assert ledger.epsilon(SLOT) == pytest.approx(_true_epsilon([(0.6, 2)]))


def test_local_dp_instances_keep_their_own_releases_across_a_successor(tmp_path: Path) -> None:
    """Local DP: each instance's releases keep their noise; the slot's ε is its most-spent instance's."""
    audit = AuditLog(tmp_path / "audit.jsonl")
    state = ServerState(tmp_path, _policy(0.6, "local_dp"), "run")
    ledger = PrivacyLedger(_policy(0.6, "local_dp"), state)
    for round_ in (1, 2):
        assert ledger.allows(SLOT, "a", round_, audit)
    state.metrics.append({"privacy": ledger.finish_round(2, [], [SLOT]).summary})
    resumed = PrivacyLedger(_policy(3.0, "local_dp"), state)
    assert resumed.allows(SLOT, "b", 3, audit)
    assert resumed.epsilon(SLOT, "a") == pytest.approx(_true_epsilon([(0.6, 2)]))
    assert resumed.epsilon(SLOT, "b") == pytest.approx(_true_epsilon([(3.0, 1)]))
    assert resumed.epsilon(SLOT) == resumed.epsilon(SLOT, "a")


def test_a_switch_to_local_dp_keeps_the_central_releases(tmp_path: Path) -> None:
    """Central -> local DP on resume: each instance's ε still counts the slot's central releases."""
    audit = AuditLog(tmp_path / "audit.jsonl")
    state = ServerState(tmp_path, _policy(0.6), "run")
    assert _train(PrivacyLedger(_policy(0.6), state), state, audit, 1, 2) == 2
    resumed = PrivacyLedger(_policy(3.0, "local_dp"), state)
    assert resumed.epsilon(SLOT) == pytest.approx(_true_epsilon([(0.6, 2)]))
    assert resumed.allows(SLOT, "inst-1", 3, audit)
    assert resumed.epsilon(SLOT, "inst-1") == pytest.approx(_true_epsilon([(0.6, 2), (3.0, 1)]))


def test_policy_diff_flags_changes_that_would_re_price_spent_privacy() -> None:
    """policy diff: a larger delta, a mode change, less noise or a larger budget loosen; more noise does not."""
    base = _policy(0.6)

    def loosened(new: Policy) -> list[str]:
        return [c.path for c in diff_policies(base, new) if c.loosened]

    assert loosened(_policy(3.0)) == []
    assert loosened(_policy(0.3)) == [f"layers.{SLOT.layer}.privacy.noise_multiplier"]
    assert loosened(_policy(0.6, "local_dp")) == [f"layers.{SLOT.layer}.privacy.mode"]
    wider = _policy(0.6).model_copy(
        update={
            "layers": [
                layer.model_copy(
                    update={
                        "privacy": Privacy(
                            mode="central_dp",
                            clip_norm=1.0,
                            noise_multiplier=0.6,
                            delta=1e-3,
                            epsilon_budget=BUDGET,
                        )
                    }
                )
                if layer.name == SLOT.layer
                else layer
                for layer in base.layers
            ]
        }
    )
    assert loosened(wider) == [f"layers.{SLOT.layer}.privacy.delta"]
