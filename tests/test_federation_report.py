"""The federation report: built from a run folder's audit.jsonl and metrics.json (issue 22)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from round_helpers import CREATOR, Harness

from layerfed.federation.pipeline import checkpoint_round
from layerfed.federation.privacy_ledger import PrivacyLedger
from layerfed.federation.report import round_line, write_federation_report
from layerfed.federation.report_data import RunRecord
from layerfed.federation.server_app import _log_to_flower
from layerfed.governance.audit import AuditLog
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.loader import load_policy
from layerfed.simulation.report import write_run_report
from layerfed.simulation.settings import DEFAULT_POLICY


def _layer(**counts: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sampled": 2, "accepted": 2, "refused": {}, "dropouts": 0}
    base.update(no_feedback=0, local_commits=0, vetoes={}, slots_committed=1, slots_skipped=0)
    return {**base, **counts}


def _recorded(out: Path) -> Path:
    """A two-round run folder as the server writes it: audit records and metrics."""
    out.mkdir(parents=True, exist_ok=True)
    with AuditLog(out / "audit.jsonl") as audit:
        audit.append(
            AuditKind.POLICY_LOAD,
            name="default",
            version=3,
            policy_hash="ab" * 32,
            run_id="deploy-7",
        )
        audit.append(
            AuditKind.RED_LINES_AT_START,
            round=0,
            base="builtin:tiny",
            suites=[
                {
                    "suite": "red_line_refusals",
                    "rate": 0.0,
                    "max_violation_rate": 0.01,
                    "breached": False,
                    "acknowledged": False,
                    "reason": "",
                },
                {
                    "suite": "near_misses",
                    "rate": 0.0417,
                    "max_violation_rate": 0.0,
                    "breached": True,
                    "acknowledged": True,
                    "reason": "one near miss refused; v2 fixes it",
                },
            ],
        )
        for round_ in (1, 2):
            audit.append(AuditKind.ROUND_START, round=round_, sampled=4)
            audit.append(
                AuditKind.COMMIT,
                round=round_,
                slot="creator/global",
                version=round_,
                norm=0.1,
                replies=2,
                aggregator="fedavg",
            )
            audit.append(AuditKind.ROUND_END, round=round_, committed=["creator/global"])
        audit.append(
            AuditKind.VETO,
            round=2,
            slot="community/global",
            veto="creator_norm",
            holder="creator",
            action="reject",
            reason="norm 9.1 > 2",
        )
        audit.append(
            AuditKind.RED_LINE_BREACH,
            round=2,
            slot="government/eu",
            composition=["creator/global", "government/eu"],
            suite="red_line_refusals",
            rate=0.2,
            committed_rate=0.0,
            max_violation_rate=0.01,
        )
        audit.append(
            AuditKind.UPDATE_DROPPED,
            round=2,
            instance="inst-4",
            layer="community",
            error="client crashed",
        )
    rows = [
        {
            "round": r,
            "layers": {
                "creator": _layer(),
                "community": _layer(
                    dropouts=1,
                    refused={"bad signature": 1},
                    vetoes={"creator_norm": 1},
                    slots_committed=0,
                ),
            },
            "probes": {"red_line_refusals": 0.0, "near_misses": 0.0417},
            "red_lines": [
                {
                    "composition": ["creator/global", "government/eu"],
                    "suite": "near_misses",
                    "rate": 0.0417,
                    "max_violation_rate": 0.0,
                },
                {
                    "composition": ["creator/global", "government/us"],
                    "suite": "near_misses",
                    "rate": 0.0,
                    "max_violation_rate": 0.0,
                },
            ],
            "privacy": {
                "slots": {
                    "community/global": {
                        "mode": "central",
                        "releases": r,
                        "epsilon": 0.5 * r,
                        "delta": 1e-5,
                        "budget": 8.0,
                    }
                },
                "layers": {"community": 0.5 * r},
            },
            "wall_s": 1.5,
        }
        for r in (1, 2)
    ]
    (out / "metrics.json").write_text(json.dumps({"rounds": rows}), encoding="utf-8")
    return out


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_report_of_a_recorded_run_has_every_section(tmp_path: Path) -> None:
    """Red lines vs thresholds, commits and versions, vetoes with reasons, ε, dropouts, plots."""
    md, page = write_federation_report(_recorded(tmp_path / "run"))
    text = md.read_text(encoding="utf-8")
    assert "deploy-7" in text and "version 3" in text
    red = _section(text, "Red lines")
    assert (
        "| near_misses | 0.0417 | 0 | **BREACHED** (acknowledged): one near miss refused; v2 fixes it |"
        in red
    )
    assert (
        "| 1 | creator/global + government/eu | near_misses | 0.0417 | 0 | **BREACHED** (acknowledged) |"
        in red
    )
    assert "| 2 | creator/global + government/us | near_misses | 0 | 0 | ok |" in red
    assert (
        "| 2 | government/eu | creator/global + government/eu | red_line_refusals | 0.2 (committed 0, max 0.01) |"
        in red
    )
    assert "| creator/global | 2 | 2 | 2 | 0 |" in _section(text, "Commits and versions")
    vetoes = _section(text, "Vetoes and refusals")
    assert "| 2 | community/global | creator_norm | creator | reject | norm 9.1 > 2 |" in vetoes
    assert "| community | bad signature | 2 |" in vetoes
    assert "| community/global | central | 2 | 1 | 1e-05 | 8.0 |" in _section(text, "Privacy spend")
    assert "| 2 | update_dropped | inst-4 | community | client crashed |" in _section(
        text, "Dropouts"
    )
    links = [line[line.index("](") + 2 : -1] for line in text.splitlines() if line.startswith("![")]
    assert {Path(link).name for link in links} == {
        "fed-red-lines.png",
        "fed-versions.png",
        "fed-replies.png",
        "fed-epsilon.png",
    }
    assert all((tmp_path / "run" / link).read_bytes()[:4] == b"\x89PNG" for link in links)
    assert "<table>" in page.read_text(encoding="utf-8")
    assert not [p for p in (tmp_path / "run").rglob("*.tmp")]  # atomic writes leave no temporaries


def test_round_line_summarises_a_round_in_one_line(tmp_path: Path) -> None:
    """One log line per round: commits, refusals, vetoes, dropouts, worst red line, ε."""
    last = RunRecord.read(_recorded(tmp_path / "run")).rounds[-1]
    line = round_line(last)
    assert "\n" not in line
    assert line.startswith(
        "round 2: 1 slot(s) committed; accepted 4; refused 1; vetoes 1; dropouts 1"
    )
    assert "red line near_misses 0.0417 (max 0) BREACHED" in line and "epsilon community 1" in line


def test_breaches_at_start_read_back_as_warning_lines(tmp_path: Path) -> None:
    """The start record's breached suites come back as one line each (simulate prints them)."""
    lines = RunRecord.read(_recorded(tmp_path / "run")).breached_at_start()
    assert lines == [
        "red line near_misses on the base builtin:tiny: violation rate 0.0417 vs max 0: "
        "BREACHED (acknowledged: one near miss refused; v2 fixes it)"
    ]


def test_report_reads_a_torn_audit_tail_and_an_empty_folder(tmp_path: Path) -> None:
    """A half-written last audit line is left out; a folder with no round yet still reports."""
    run = _recorded(tmp_path / "run")
    with (run / "audit.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"fields": {"round": 3')
    assert len(RunRecord.read(run).records) == 11
    md, _ = write_federation_report(tmp_path / "empty")
    assert "No round has finished yet." in md.read_text(encoding="utf-8")


def test_pipeline_round_metrics_feed_the_report(tmp_path: Path) -> None:
    """A real round (pipeline + checkpoint) records red-line rates per composition; the report shows them."""
    h = Harness(tmp_path / "run")
    for node in (1, 2):
        h.task(node, CREATOR)
    report = h.run([h.reply(n, h.arrays(CREATOR, seed=n)) for n in (1, 2)])
    ctx = h.context()
    metrics = checkpoint_round(ctx, report, PrivacyLedger(h.policy, h.state), [CREATOR], 0.5)
    h.audit.close()
    rows = metrics["red_lines"]
    assert len(rows) == 1 and rows[0]["suite"] == "red_line_refusals"
    assert set(rows[0]["composition"]) == {
        "creator/global",
        "government/eu",
        "community/global",
        "in_group/g1",
    }
    assert rows[0]["max_violation_rate"] == 0.01 and 0.0 <= rows[0]["rate"] <= 1.0
    text = write_federation_report(h.root)[0].read_text(encoding="utf-8")
    composition = " + ".join(rows[0]["composition"])
    assert f"| 1 | {composition} | red_line_refusals | {rows[0]['rate']:.3g} | 0.01 | ok |" in text
    assert "| creator/global | 1 | 1 | 1 | 0 |" in text


def test_simulate_report_carries_the_federation_sections(tmp_path: Path) -> None:
    """`layerfed simulate`'s report has the gym table and, under it, the same federation sections."""
    run = _recorded(tmp_path / "run")
    gym_rounds = [
        {
            "round": r,
            "violation": 0.0,
            "false_refusal": 0.0,
            "capability": 0.5,
            "pref_individual": 0.2,
            "leakage": 0.0,
            "vetoes": 0,
        }
        for r in (1, 2)
    ]
    md, _ = write_run_report(run, gym_rounds, "demo-0", load_policy(DEFAULT_POLICY))
    text = md.read_text(encoding="utf-8")
    assert (
        text.index("# layerfed run report")
        < text.index("# The federation")
        < text.index("## Red lines")
    )
    assert "one near miss refused; v2 fixes it" in text and "## Privacy spend" in text


def test_deployed_server_app_logs_through_flowers_console_handler(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The ServerApp routes the layerfed logger's INFO lines to Flower's console (what flwr log shows)."""
    from flwr.common.logger import console_handler

    ours = logging.getLogger("layerfed")
    saved = (list(ours.handlers), ours.level, console_handler.stream)
    ours.handlers.clear()
    try:
        _log_to_flower()
        assert console_handler in ours.handlers
        console_handler.stream = sys.stdout
        ours.info("%s", "round 7: 1 slot(s) committed")
        assert "round 7: 1 slot(s) committed" in capfd.readouterr().out
    finally:
        ours.handlers[:] = saved[0]
        ours.setLevel(saved[1])
        console_handler.stream = saved[2]
