"""A sampled instance with nothing to learn from says so; the server audits it, not a dropout."""

from __future__ import annotations

from pathlib import Path

from deploy_helpers import make_fleet
from flwr.app import Context, Message, MetricRecord, RecordDict
from journal_crash_child import train_message
from round_helpers import COMMUNITY, Harness

from layerfed.clients.client_app import handle_train
from layerfed.clients.config import InstanceConfig
from layerfed.clients.journal import FeedbackJournal
from layerfed.clients.node import NodeSource
from layerfed.governance.canonical import policy_hash
from layerfed.governance.signing import read_policy
from layerfed.layers.slots import SlotId
from layerfed.wire.protocol import ENVELOPE, METRICS, NO_FEEDBACK, UPDATE, Task


def test_a_node_with_an_empty_journal_replies_no_feedback_and_keeps_nothing_open(
    tmp_path: Path,
) -> None:
    """handle_train on a deployed node with no pending feedback: a reply without envelope or
    update, metric no_feedback = 1, and no live batch left in the journal."""
    fleet = make_fleet(tmp_path, {"carol": ("creator",)})
    files = fleet.instances["carol"]
    slot = SlotId("creator", "global")
    task = Task(
        "run-empty",
        1,
        0,
        "carol",
        "creator",
        slot,
        {},
        policy_hash=policy_hash(read_policy(InstanceConfig.load(files.config).policy)),
    )
    context = Context(
        run_id=1,
        node_id=2,
        node_config={"instance-config": str(files.config)},
        state=RecordDict(),
        run_config={"layerfed-seed": 0},
    )
    reply = handle_train(train_message(task), context, NodeSource())
    assert ENVELOPE not in reply.content.config_records
    assert UPDATE not in reply.content.array_records
    assert reply.content.metric_records[METRICS][NO_FEEDBACK] == 1.0
    with FeedbackJournal(files.journal) as journal:
        assert {b.state for b in journal.batches()} <= {"released"}
        assert journal.counts().get("pending", 0) == 0


def test_the_server_audits_no_feedback_and_keeps_the_round_going(tmp_path: Path) -> None:
    """A no-feedback reply is counted and audited as such (not refused, not a dropout) while
    the other replies of the slot still commit."""
    h = Harness(tmp_path)
    for node in (1, 2, 3):
        h.task(node, COMMUNITY)
    quiet = Message(
        RecordDict({METRICS: MetricRecord({"num_examples": 0.0, NO_FEEDBACK: 1.0})}),
        reply_to=h.instructions[3],
    )
    report = h.run(
        [h.reply(1, h.arrays(COMMUNITY, seed=1)), h.reply(2, h.arrays(COMMUNITY, seed=2)), quiet]
    )
    stats = report.metrics["layers"]["community"]
    assert stats["no_feedback"] == 1 and stats["dropouts"] == 0 and not stats["refused"]
    assert [r["instance"] for r in h.records("no_feedback")] == ["inst-3"]
    assert "community/global" in report.committed
    assert 3 not in report.unreachable
