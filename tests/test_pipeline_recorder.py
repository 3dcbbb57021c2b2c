"""The pipeline's one recorder, its typed metrics, and the rule that stages never write the audit."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from layerfed.federation import stages
from layerfed.federation.events import AuditEvent, Count, event
from layerfed.federation.recorder import Recorder
from layerfed.federation.round_metrics import LayerMetrics, RoundTally
from layerfed.governance.audit import AuditLog, verify_audit
from layerfed.governance.audit_events import AuditKind

HISTORICAL_KEYS = [
    "sampled",
    "accepted",
    "refused",
    "dropouts",
    "no_feedback",
    "local_commits",
    "vetoes",
    "slots_committed",
    "slots_skipped",
    "norm_mean",
    "norm_max",
]
"""A layer's metric keys in ``metrics.json`` before the pipeline (their order included)."""


def test_recorder_writes_events_in_order_with_their_fields(tmp_path: Path) -> None:
    """Recorder: each event becomes one record, in the order given, with its kind and fields."""
    events = (
        event(AuditKind.UPDATE_MISSING, round=1, instance="a", layer="creator", node="7"),
        event(AuditKind.SLOT_SKIPPED, round=1, slot="creator/global", survivors=0, min_clients=1),
        event(AuditKind.COMMIT, round=1, slot="community/global", version=2, norm=0.5),
    )
    with AuditLog(tmp_path / "audit.jsonl") as audit:
        recorder = Recorder(audit)
        with audit.batch():
            recorder.record(events[:2])
            recorder.record(events[2:])
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["update_missing", "slot_skipped", "commit"]
    assert [r["fields"] for r in lines] == [dict(e.fields) for e in events]
    assert recorder.written == 3 and verify_audit(tmp_path / "audit.jsonl").ok


def test_event_keeps_its_fields_in_the_order_given() -> None:
    """AuditEvent: fields keep keyword order (the order AuditLog.append receives them)."""
    e = event(AuditKind.VETO, round=1, slot="s", veto="v", holder="h", action="clip", reason="r")
    assert [k for k, _ in e.fields] == ["round", "slot", "veto", "holder", "action", "reason"]
    assert list(e.as_fields()) == ["round", "slot", "veto", "holder", "action", "reason"]


def test_layer_metrics_give_the_historical_dict() -> None:
    """LayerMetrics.as_dict: the historical keys and order; reasons and vetoes in first-counted order."""
    tally = RoundTally()
    tally.add(
        [
            Count("creator", "sampled", n=3),
            Count("creator", "refused", key="not_finite"),
            Count("creator", "refused", key="forged_claim"),
            Count("creator", "refused", key="not_finite"),
            Count("creator", "accepted"),
            Count("creator", "norms", norm=2.0),
            Count("creator", "norms", norm=4.0),
            Count("creator", "vetoes", key="government_norm:clip"),
            Count("creator", "slots_committed"),
        ]
    )
    got = tally.layers["creator"].as_dict()
    assert list(got) == HISTORICAL_KEYS
    assert list(got["refused"].items()) == [("not_finite", 2), ("forged_claim", 1)]
    assert got["vetoes"] == {"government_norm:clip": 1}
    assert (got["sampled"], got["accepted"], got["slots_committed"]) == (3, 1, 1)
    assert (got["norm_mean"], got["norm_max"]) == (3.0, 4.0)
    assert list(LayerMetrics().as_dict()) == HISTORICAL_KEYS
    assert LayerMetrics().as_dict()["norm_mean"] == 0.0


@pytest.mark.parametrize(
    "path", sorted(Path(stages.__file__).parent.glob("*.py")), ids=lambda p: p.name
)
def test_no_stage_touches_the_audit_log(path: Path) -> None:
    """Stages return events: none reads ``.audit``, calls ``.append`` on it, or borrows the log."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & {"audit", "lend", "batch"}, path.name


def test_stage_results_carry_typed_events() -> None:
    """AuditEvent is frozen and carries an AuditKind (not a string)."""
    e = AuditEvent(AuditKind.NO_FEEDBACK, (("round", 1),))
    with pytest.raises(AttributeError):
        e.kind = AuditKind.COMMIT  # type: ignore[misc]
    assert isinstance(e.kind, AuditKind)
