"""Each stage of the server's slot-update pipeline on typed inputs, with no Flower grid."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from round_helpers import CREATOR, GOV_EU, Harness

from layerfed.federation.aggregate import AggregateResult, Reply, SlotOutcome, fedavg
from layerfed.federation.committed import CommittedArrays
from layerfed.federation.privacy import Aggregation, central_dp
from layerfed.federation.privacy_ledger import PrivacyRound
from layerfed.federation.redline_gate import Breach
from layerfed.federation.secure_sum import SecureSum
from layerfed.federation.stages import judge as judge_stage
from layerfed.federation.stages.aggregate import SlotReplies, aggregate_secure, aggregate_slot
from layerfed.federation.stages.checkpoint import CheckpointInput, close_round
from layerfed.federation.stages.commit import CommitInput, commit
from layerfed.federation.stages.intake import intake
from layerfed.federation.stages.judge import JudgeInput, judge
from layerfed.federation.stages.step import StepInput, take_step
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.schema import Privacy
from layerfed.layers.arrays import (
    Arrays,
    add_gaussian,
    apply_step,
    global_norm,
    noise_rng,
    scale,
    server_step,
)
from layerfed.layers.errors import ArrayError
from layerfed.layers.slots import SlotId

COMMUNITY = SlotId("community", "global")


def _kinds(events: Any) -> list[AuditKind]:
    return [e.kind for e in events]


def test_intake_groups_verified_updates_and_reports_each_refusal_as_an_event(
    tmp_path: Path,
) -> None:
    """Intake: missing, forged, failed and unsolicited replies are events and counts; no audit write."""
    h = Harness(tmp_path)
    for node in (1, 2, 3):
        h.task(node, CREATOR)
    h.task(4, COMMUNITY)
    h.task(9, CREATOR)
    unsolicited = h.reply(9, h.arrays(CREATOR, seed=9))
    del h.pending[9]
    replies = [
        h.reply(1, h.arrays(CREATOR, seed=1)),
        h.reply(2, h.arrays(CREATOR, seed=2), layer="community"),
        h.error_reply(3),
        unsolicited,
    ]
    before = h.audit.records
    got = intake(h.context(), replies)
    assert h.audit.records == before  # the stage returns events; it writes nothing
    assert _kinds(got.events) == [
        AuditKind.UPDATE_MISSING,
        AuditKind.UPDATE_RECEIVED,
        AuditKind.UPDATE_REFUSED,
        AuditKind.UPDATE_DROPPED,
        AuditKind.REPLY_UNEXPECTED,
    ]
    assert got.events[2].as_fields()["reason"] == "forged_claim"
    assert list(got.groups) == [CREATOR]
    assert [r.client_id for r in got.groups[CREATOR]] == ["inst-1"]
    assert sorted(got.unreachable) == [3, 4]
    refused = [(c.layer, c.key) for c in got.counts if c.counter == "refused"]
    assert refused == [("creator", "forged_claim")]
    assert sum(c.n for c in got.counts if c.counter == "sampled") == 4


def test_aggregate_refuses_invalid_replies_and_skips_a_slot_without_survivors(
    tmp_path: Path,
) -> None:
    """Aggregate: a NaN reply is refused (event, count); the mean is the survivors' FedAvg; none left: skipped."""
    h = Harness(tmp_path)
    good = [Reply(h.arrays(GOV_EU, seed=s), 8.0, f"inst-{s}") for s in (1, 2)]
    bad_arrays = h.arrays(GOV_EU, seed=3)
    name = sorted(bad_arrays)[0]
    bad_arrays[name] = bad_arrays[name].copy()
    bad_arrays[name].flat[0] = np.nan
    bad = Reply(bad_arrays, 8.0, "inst-3")
    got = aggregate_slot(h.context(), SlotReplies(GOV_EU, (*good, bad), 10**9))
    assert got.mean is not None and got.used == ("inst-1", "inst-2")
    expected = fedavg(good)
    assert all(np.array_equal(got.mean[n], expected[n]) for n in expected)
    assert _kinds(got.events) == [AuditKind.UPDATE_REFUSED]
    assert got.events[0].as_fields()["reason"] == "not_finite"
    skipped = aggregate_slot(h.context(), SlotReplies(GOV_EU, (bad,), 10**9))
    assert skipped.mean is None
    assert _kinds(skipped.events) == [AuditKind.UPDATE_REFUSED, AuditKind.SLOT_SKIPPED]
    assert skipped.events[1].as_fields()["survivors"] == 0


def test_a_secure_slot_enters_aggregate_with_its_unmasked_mean(tmp_path: Path) -> None:
    """Aggregate, secure: the unmasked mean passes with sorted contributors; a failed cohort is skipped."""
    h = Harness(tmp_path)
    mean = h.arrays(COMMUNITY, seed=1)
    done = SecureSum(mean, {"b": "d2", "a": "d1"}, 16.0, cohort=3, survivors=2)
    got = aggregate_secure(h.context(), COMMUNITY, done)
    assert got.mean is mean and got.used == ("a", "b") and got.events == ()
    assert [(c.counter, c.n) for c in got.counts] == [
        ("sampled", 3),
        ("dropouts", 1),
        ("accepted", 2),
    ]
    failed = SecureSum(None, {}, 0.0, cohort=3, survivors=1, reason="too_many_dropouts: 1 of 3")
    skipped = aggregate_secure(h.context(), COMMUNITY, failed)
    assert skipped.mean is None
    assert _kinds(skipped.events) == [AuditKind.SLOT_SKIPPED]
    assert skipped.events[0].as_fields()["reason"] == "too_many_dropouts: 1 of 3"


def test_central_dp_wraps_aggregation_clipping_each_reply_and_noising_the_mean_once() -> None:
    """DP wrapper: the inner aggregator sees replies clipped to clip_norm at weight 1; noise is one draw."""
    seen: list[list[Reply]] = []
    zero = {"w": np.zeros((4, 3), np.float32)}

    def inner(replies: Any) -> Aggregation:
        seen.append(list(replies))
        return Aggregation(SlotOutcome({}, AggregateResult(zero, used=("a", "b"))))

    privacy = Privacy(mode="central_dp", clip_norm=1.0, noise_multiplier=2.0)
    wrapped = central_dp(inner, privacy, round_=3, slot=COMMUNITY, noise_seed=5)
    replies = [Reply({"w": np.full((4, 3), 10.0, np.float32)}, 7.0, i) for i in ("a", "b")]
    got = wrapped(replies)
    assert len(seen) == 1
    assert all(r.weight == 1.0 and global_norm(r.arrays) <= 1.0 + 1e-6 for r in seen[0])
    std = 2.0 * 1.0 / 2
    once = add_gaussian(zero, std, noise_rng(5, [3, zlib.crc32(b"community/global")]))
    assert got.outcome.result is not None
    assert np.array_equal(got.outcome.result.arrays["w"], once["w"])
    assert got.released and _kinds(got.events) == [AuditKind.PRIVACY_NOISE]
    assert got.events[0].as_fields()["std"] == std


def test_central_dp_adds_no_noise_when_the_slot_is_skipped() -> None:
    """DP wrapper: no aggregate (too few survivors) means no noise, no release, no event."""
    privacy = Privacy(mode="central_dp", clip_norm=1.0, noise_multiplier=2.0)

    def inner(replies: Any) -> Aggregation:
        return Aggregation(SlotOutcome({}, None))

    got = central_dp(inner, privacy, round_=1, slot=COMMUNITY, noise_seed=1)([])
    assert got.outcome.result is None and not got.released and got.events == ()


def test_step_applies_the_server_rate_exactly_once() -> None:
    """Step: step = server_lr * mean (not server_lr squared), candidate = current + step."""
    mean = {"w": np.full((2, 2), 1.0, np.float32)}
    current = {"w": np.full((2, 2), 3.0, np.float32), "v": np.ones(3, np.float32)}
    got = take_step(StepInput(COMMUNITY, mean, current, server_lr=0.5))
    assert np.array_equal(got.step["w"], np.full((2, 2), 0.5, np.float32))
    assert got.candidate is not None
    assert np.array_equal(got.candidate["w"], np.full((2, 2), 3.5, np.float32))
    assert got.candidate["v"] is not current["v"] and np.array_equal(
        got.candidate["v"], current["v"]
    )


def test_step_that_cannot_be_applied_leaves_the_candidate_none_with_the_error() -> None:
    """Step: a float32 overflow gives no candidate and the ArrayError the judge raises if it commits."""
    mean = {"w": np.full(2, 3e38, np.float32)}
    with np.errstate(over="ignore"):
        got = take_step(StepInput(COMMUNITY, mean, {"w": np.zeros(2, np.float32)}, server_lr=2.0))
    assert got.candidate is None and isinstance(got.error, ArrayError)


def _judge_input(h: Harness, slot: SlotId, step: Arrays) -> JudgeInput:
    committed = CommittedArrays(h.state, h.stack, h.round)
    current = committed(slot)
    candidate = apply_step(current, step)
    return JudgeInput(slot, step, current, candidate, frozenset(), committed)


def test_the_gate_gets_the_candidate_it_is_handed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Judge: with no veto hit, the red-line gate is handed the step stage's candidate object itself."""
    h = Harness(tmp_path)
    handed: list[Arrays] = []

    def gate(ctx: Any, slot: SlotId, candidate: Arrays, committed: Any) -> Breach | None:
        handed.append(candidate)
        return None

    monkeypatch.setattr(judge_stage, "redline_breach", gate)
    given = _judge_input(h, CREATOR, scale(h.arrays(CREATOR, seed=1), 1.0))
    verdict = judge(h.context(), given)
    assert verdict.commit and handed == [given.candidate] and handed[0] is given.candidate
    assert verdict.candidate is given.candidate and verdict.events == ()


def test_a_clipping_veto_recomputes_the_candidate_from_the_clipped_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Judge: a norm clip rewrites the step; the gate and the commit get current + clipped step."""
    h = Harness(tmp_path)
    policy = h.policy.model_copy(
        update={"vetoes": [v for v in h.policy.vetoes if v.name == "government_norm"]}
    )
    handed: list[Arrays] = []
    monkeypatch.setattr(judge_stage, "redline_breach", lambda c, s, cand, r: handed.append(cand))
    step = scale(h.arrays(COMMUNITY, seed=1), 1.0)
    step = scale(step, 8.0 / global_norm(step))  # over government_norm's max_norm of 5
    given = _judge_input(h, COMMUNITY, step)
    verdict = judge(h.context(policy), given)
    assert verdict.commit and _kinds(verdict.events) == [AuditKind.VETO]
    assert [c.key for c in verdict.counts] == ["government_norm:clip"]
    assert global_norm(verdict.step) == pytest.approx(5.0, rel=1e-6)
    expected = apply_step(given.current, verdict.step)
    assert verdict.candidate is handed[0] and verdict.candidate is not given.candidate
    assert all(np.array_equal(verdict.candidate[n], expected[n]) for n in expected)


def test_a_red_line_breach_refuses_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Judge: a breach from the gate means no commit, a red_line:reject count and its event."""
    h = Harness(tmp_path)
    breach = Breach(("creator/global",), "red_line_refusals", 0.6, 0.2, 0.5)
    monkeypatch.setattr(judge_stage, "redline_breach", lambda *a: breach)
    verdict = judge(h.context(), _judge_input(h, CREATOR, h.arrays(CREATOR, seed=1)))
    assert not verdict.commit and verdict.candidate is None
    assert _kinds(verdict.events) == [AuditKind.RED_LINE_BREACH]
    assert [(c.counter, c.key) for c in verdict.counts] == [
        ("vetoes", "red_line:reject"),
        ("slots_skipped", ""),
    ]


def test_commit_writes_the_candidate_as_the_next_version(tmp_path: Path) -> None:
    """Commit: state holds the candidate; the commit event reports the step's norm and the replies."""
    h = Harness(tmp_path)
    step = h.arrays(CREATOR, seed=1)
    candidate = apply_step(h.committed(CREATOR), step)
    got = commit(h.context(), CommitInput(CREATOR, candidate, step, ("a", "b")))
    assert got.version == h.state.version(CREATOR) == 1
    assert all(np.array_equal(h.committed(CREATOR)[n], candidate[n]) for n in candidate)
    fields = got.events[0].as_fields()
    assert got.events[0].kind == AuditKind.COMMIT and fields["replies"] == 2
    assert fields["norm"] == global_norm(step) and fields["version"] == 1


def test_the_whole_round_commits_current_plus_server_lr_times_the_mean(tmp_path: Path) -> None:
    """Pipeline: the committed slot is exactly current + server_lr * FedAvg (the rate applied once)."""
    h = Harness(tmp_path)
    h.task(1, GOV_EU)
    h.task(2, GOV_EU)
    arrays = [h.arrays(GOV_EU, seed=n) for n in (1, 2)]
    before = h.committed(GOV_EU)
    report = h.run([h.reply(n, a) for n, a in zip((1, 2), arrays, strict=True)])
    assert report.committed == [str(GOV_EU)]
    mean = fedavg([Reply(a, 8.0, f"inst-{n}") for n, a in zip((1, 2), arrays, strict=True)])
    lr = h.policy.layer("government").server_lr
    assert lr != 1.0
    expected = apply_step(before, server_step(mean, lr))
    assert all(np.array_equal(h.committed(GOV_EU)[n], expected[n]) for n in expected)


def test_checkpoint_adds_privacy_and_wall_time_and_closes_the_round() -> None:
    """Checkpoint: ε joins DP layers' metrics last, then privacy and wall_s; events end with round_end."""
    metrics = {
        "round": 2,
        "layers": {"community": {"sampled": 1}, "creator": {"sampled": 2}},
        "probes": {},
    }
    spent = PrivacyRound({"slots": {}}, {"community": 0.5}, ())
    got = close_round(CheckpointInput(2, metrics, ("creator/global",), spent, 1.5))
    assert list(got.metrics) == ["round", "layers", "probes", "privacy", "wall_s"]
    assert got.metrics["layers"]["community"] == {"sampled": 1, "epsilon": 0.5}
    assert got.metrics["layers"]["creator"] == {"sampled": 2}
    assert metrics["layers"]["community"] == {"sampled": 1}  # the input is not modified
    assert _kinds(got.events) == [AuditKind.ROUND_END]
    assert got.events[0].as_fields() == {"round": 2, "committed": ["creator/global"]}
