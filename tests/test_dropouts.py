"""Clients that vanish mid-round: error replies and replies that never come.

A round completes for the slots that still reach their ``min_clients``; the
others are skipped, and every dropout and skip is in the audit log.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from round_helpers import COMMUNITY, CREATOR, GOV_EU, Harness, policy

from layerfed.layers.slots import SlotId

DROPOUT_CASES = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _tasks(h: Harness, slots: dict[SlotId, list[int]]) -> None:
    for slot, nodes in slots.items():
        for node in nodes:
            h.task(node, slot)


def test_round_completes_for_slots_that_reach_min_clients(tmp_path: Path) -> None:
    """Error replies and silent nodes skip only the slots left below min_clients."""
    h = Harness(tmp_path / "dropouts")
    _tasks(h, {GOV_EU: [1, 2, 3], COMMUNITY: [4, 5, 6], CREATOR: [7, 8]})
    replies = [
        h.reply(1, h.arrays(GOV_EU, seed=1)),
        h.error_reply(2, "ClientApp raised"),
        h.error_reply(3, "timed out"),
        h.reply(4, h.arrays(COMMUNITY, seed=4)),
        h.reply(5, h.arrays(COMMUNITY, seed=5)),
    ]  # node 6 (community) and nodes 7, 8 (creator) never answer
    report = h.run(replies)
    assert report.committed == [str(COMMUNITY)]
    assert sorted(report.unreachable) == [2, 3, 6, 7, 8]
    dropped = {(r["instance"], r["error"]) for r in h.records("update_dropped")}
    assert dropped == {("inst-2", "ClientApp raised"), ("inst-3", "timed out")}
    assert [r["instance"] for r in h.records("update_missing")] == ["inst-6", "inst-7", "inst-8"]
    skipped = {r["slot"]: (r["survivors"], r["min_clients"]) for r in h.records("slot_skipped")}
    assert skipped == {str(GOV_EU): (1, 2), str(CREATOR): (0, 1)}
    layers = report.metrics["layers"]
    assert (layers["government"]["dropouts"], layers["government"]["slots_skipped"]) == (2, 1)
    assert (layers["community"]["dropouts"], layers["community"]["slots_committed"]) == (1, 1)
    assert (layers["creator"]["dropouts"], layers["creator"]["slots_skipped"]) == (2, 1)


def test_dropouts_leave_the_survivors_result_unchanged(tmp_path: Path) -> None:
    """A slot with dropouts commits exactly what its survivors alone would commit."""
    h = Harness(tmp_path / "dropouts")
    _tasks(h, {COMMUNITY: [1, 2, 3, 4]})
    h.run(
        [
            h.reply(1, h.arrays(COMMUNITY, seed=1)),
            h.error_reply(2),
            h.reply(3, h.arrays(COMMUNITY, seed=3)),
        ]
    )
    clean = Harness(tmp_path / "clean")
    _tasks(clean, {COMMUNITY: [1, 3]})
    clean.run([clean.reply(n, clean.arrays(COMMUNITY, seed=n)) for n in (1, 3)])
    assert h.state.digest() == clean.state.digest()
    assert h.redline_rate() == clean.redline_rate()


def test_every_node_dropping_out_commits_nothing(tmp_path: Path) -> None:
    """A round in which every node fails commits nothing and skips every slot, audited."""
    h = Harness(tmp_path)
    _tasks(h, {CREATOR: [1], COMMUNITY: [2, 3], GOV_EU: [4, 5]})
    report = h.run([h.error_reply(1), h.error_reply(4)])
    assert report.committed == [] and h.records("commit") == []
    assert sorted(r["slot"] for r in h.records("slot_skipped")) == sorted(
        str(s) for s in (CREATOR, COMMUNITY, GOV_EU)
    )
    assert report.summary == {"accepted": 0.0, "refused": 0.0, "slots_committed": 0.0}


@DROPOUT_CASES
@given(fates=st.lists(st.sampled_from(["reply", "error", "silent"]), min_size=1, max_size=6))
def test_each_task_is_accounted_for_once(
    tmp_path_factory: pytest.TempPathFactory, fates: list[str]
) -> None:
    """Every task ends as exactly one of received or dropped; commit iff min_clients reached."""
    root = tmp_path_factory.mktemp("fates")
    h = Harness(root)
    nodes = list(range(1, len(fates) + 1))
    _tasks(h, {COMMUNITY: nodes})
    replies: list[Message] = []
    for node, fate in zip(nodes, fates, strict=True):
        if fate == "reply":
            replies.append(h.reply(node, h.arrays(COMMUNITY, seed=node)))
        elif fate == "error":
            replies.append(h.error_reply(node))
    report = h.run(replies)
    received = {r["instance"] for r in h.records("update_received")}
    dropped = [r["instance"] for r in h.records("update_dropped") + h.records("update_missing")]
    assert len(dropped) == len(set(dropped))
    assert received.isdisjoint(dropped)
    assert received | set(dropped) == {f"inst-{n}" for n in nodes}
    survivors = fates.count("reply")
    reached = survivors >= policy().layer("community").min_clients
    assert (report.committed == [str(COMMUNITY)]) == reached
    assert len(h.records("slot_skipped")) == (0 if reached else 1)
