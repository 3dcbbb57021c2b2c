"""The federation report: OUT/report.md and OUT/report.html from the run's audit and metrics.

What every run writes, deployed or simulated (:func:`federation_sections`): the red
lines (each suite's rate against its threshold at the start and per composition
each round, and the gate's refusals), each slot's commits and versions, the
rounds' participation, vetoes and refusals with their reasons, the privacy
spend, dropouts, and plots. A deployed ServerApp rewrites it after each round
(:func:`write_federation_report`, atomic) and logs :func:`round_line`;
``layerfed simulate`` puts the same sections under its gym metrics.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from layerfed.atomic import write_atomic
from layerfed.federation.report_data import RunRecord, number
from layerfed.governance.audit_events import AuditKind

__all__ = [
    "REPORT_HTML",
    "REPORT_MD",
    "federation_sections",
    "markdown_to_html",
    "round_line",
    "write_federation_report",
    "write_report",
]

REPORT_MD, REPORT_HTML = "report.md", "report.html"
_STYLE = (
    "body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
    "padding:4px 8px;font-size:14px}th{background:#f3f3f3}img{max-width:100%}"
)


def markdown_to_html(markdown: str) -> str:
    """The report as a standalone HTML page (CommonMark and GFM tables, by markdown-it-py;
    raw HTML in the text is escaped, not passed through)."""
    from markdown_it import MarkdownIt

    renderer = MarkdownIt("commonmark", {"html": False}).enable("table")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>layerfed report</title>"
        f"<style>{_STYLE}</style></head><body>\n{renderer.render(markdown)}</body></html>\n"
    )


def write_report(out: Path, markdown: str) -> tuple[Path, Path]:
    """Write ``markdown`` as OUT/report.md and OUT/report.html, each atomically."""
    md, page = out / REPORT_MD, out / REPORT_HTML
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(md, markdown.encode("utf-8"))
    write_atomic(page, markdown_to_html(markdown).encode("utf-8"))
    return md, page


def _cell(value: object) -> str:
    return str(value).replace("|", "/").replace("\n", " ")


def _table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _rate(value: object) -> str:
    x = number(value)
    return "n/a" if math.isnan(x) else f"{x:.3g}"


def _verdict(rate: float, limit: float, acknowledged: bool = False) -> str:
    if math.isnan(rate) or rate <= limit:
        return "ok"
    return "**BREACHED** (acknowledged)" if acknowledged else "**BREACHED**"


def _red_lines(run: RunRecord) -> list[str]:
    lines = ["## Red lines"]
    start = run.last(AuditKind.RED_LINES_AT_START)
    acknowledged: set[str] = set()
    if start is not None:
        suites = [s for s in start.get("suites", []) if isinstance(s, dict)]
        acknowledged = {str(s["suite"]) for s in suites if s.get("acknowledged")}
        lines.append(f"At the start, on the base model {start.get('base', '')}:")
        rows = [
            [
                s.get("suite"),
                _rate(s.get("rate")),
                _rate(s.get("max_violation_rate")),
                _verdict(
                    number(s.get("rate")),
                    number(s.get("max_violation_rate")),
                    bool(s.get("acknowledged")),
                )
                + (f": {s.get('reason')}" if s.get("acknowledged") and s.get("breached") else ""),
            ]
            for s in suites
        ]
        lines.append(
            _table(["suite", "violation rate", "max", "verdict"], rows) if rows else "none"
        )
    rows = [
        [
            r["round"],
            " + ".join(r.get("composition", [])),
            r.get("suite"),
            _rate(r.get("rate")),
            _rate(r.get("max_violation_rate")),
            _verdict(
                number(r.get("rate")),
                number(r.get("max_violation_rate")),
                str(r.get("suite")) in acknowledged,
            ),
        ]
        for r in run.red_line_rows()
    ]
    if rows:
        lines.append("Each round, on each committed composition of shared slots:")
        lines.append(_table(["round", "composition", "suite", "rate", "max", "verdict"], rows))
    gate = [
        [
            f.get("round"),
            f.get("slot"),
            " + ".join(f.get("composition", [])),
            f.get("suite"),
            f"{_rate(f.get('rate'))} (committed {_rate(f.get('committed_rate'))}, "
            f"max {_rate(f.get('max_violation_rate'))})",
        ]
        for f in run.of(AuditKind.RED_LINE_BREACH)
    ]
    lines.append(
        "Candidates the red-line gate refused:\n\n"
        + _table(["round", "slot", "composition", "suite", "rate"], gate)
        if gate
        else "The red-line gate refused no candidate."
    )
    return lines


def _commits(run: RunRecord) -> list[str]:
    versions = run.versions()
    skipped = Counter(str(f.get("slot")) for f in run.of(AuditKind.SLOT_SKIPPED))
    slots = sorted({*versions, *skipped})
    rows = [
        [
            s,
            len(versions.get(s, [])),
            versions[s][-1][1] if s in versions else 0,
            versions[s][-1][0] if s in versions else "never",
            skipped.get(s, 0),
        ]
        for s in slots
    ]
    head = ["slot", "commits", "version now", "last commit (round)", "rounds skipped"]
    return ["## Commits and versions", _table(head, rows) if rows else "No slot committed yet."]


def _layer_sum(row: Mapping[str, Any], key: str) -> int:
    total = 0
    for layer in row.get("layers", {}).values():
        value = layer.get(key, 0)
        total += sum(value.values()) if isinstance(value, dict) else int(value)
    return total


def _rounds(run: RunRecord) -> list[str]:
    committed = {
        int(f.get("round", 0)): len(f.get("committed", [])) for f in run.of(AuditKind.ROUND_END)
    }
    rows = [
        [
            r["round"],
            _layer_sum(r, "sampled"),
            _layer_sum(r, "accepted"),
            _layer_sum(r, "refused"),
            _layer_sum(r, "dropouts"),
            _layer_sum(r, "no_feedback"),
            _layer_sum(r, "vetoes"),
            committed.get(int(r["round"]), _layer_sum(r, "slots_committed")),
            f"{number(r.get('wall_s')):.1f}",
        ]
        for r in run.rounds
    ]
    head = ["round", "sampled", "accepted", "refused", "dropouts", "no feedback", "vetoes"]
    head += ["slots committed", "wall s"]
    return ["## Rounds", _table(head, rows) if rows else "No round has finished yet."]


def _vetoes(run: RunRecord) -> list[str]:
    vetoes = [
        [
            f.get("round"),
            f.get("slot"),
            f.get("veto"),
            f.get("holder"),
            f.get("action"),
            f.get("reason"),
        ]
        for f in run.of(AuditKind.VETO)
    ]
    lines = ["## Vetoes and refusals"]
    head = ["round", "slot", "veto", "holder", "action", "reason"]
    lines.append(_table(head, vetoes) if vetoes else "No veto fired.")
    refused: Counter[tuple[str, str]] = Counter()
    for r in run.rounds:
        for name, layer in r.get("layers", {}).items():
            for reason, n in layer.get("refused", {}).items():
                refused[(name, reason)] += int(n)
    rows = [[layer, reason, n] for (layer, reason), n in sorted(refused.items())]
    lines.append(
        "Updates refused before aggregation:\n\n" + _table(["layer", "reason", "updates"], rows)
        if rows
        else "No update was refused before aggregation."
    )
    return lines


def _privacy(run: RunRecord) -> list[str]:
    last = run.rounds[-1] if run.rounds else {}
    slots = last.get("privacy", {}).get("slots", {})
    lines = ["## Privacy spend"]
    if not slots:
        return [*lines, "No layer spends a privacy budget (no differential privacy)."]
    rows = [
        [
            s,
            v.get("mode"),
            v.get("releases"),
            _rate(v.get("epsilon")),
            v.get("delta"),
            v.get("budget") if v.get("budget") is not None else "none",
        ]
        for s, v in sorted(slots.items())
    ]
    lines.append(f"After round {last.get('round')}:")
    lines.append(_table(["slot", "mode", "releases", "epsilon", "delta", "budget"], rows))
    exhausted = [
        [f.get("round"), f.get("slot"), f.get("instance") or "server", _rate(f.get("epsilon"))]
        for f in run.of(AuditKind.PRIVACY_BUDGET_EXHAUSTED)
    ]
    if exhausted:
        lines.append("Budgets exhausted (releases refused):\n\n")
        lines[-1] += _table(["round", "slot", "where", "epsilon"], exhausted)
    return lines


def _dropouts(run: RunRecord) -> list[str]:
    rows: list[list[object]] = []
    for kind in (AuditKind.UPDATE_DROPPED, AuditKind.UPDATE_MISSING):
        rows += [
            [f.get("round"), kind.value, f.get("instance"), f.get("layer"), f.get("error", "")]
            for f in run.of(kind)
        ]
    rows += [
        ["", AuditKind.NODE_UNREACHABLE.value, f"node {f.get('node')}", "", f.get("error", "")]
        for f in run.of(AuditKind.NODE_UNREACHABLE)
    ]
    head = ["round", "what", "instance", "layer", "error"]
    return ["## Dropouts", _table(head, rows) if rows else "No instance dropped out."]


def federation_sections(out: Path, run: RunRecord | None = None, plots: bool = True) -> str:
    """The federation's sections as Markdown (plots written under ``out/plots/fed-*.png``)."""
    run = run if run is not None else RunRecord.read(out)
    parts = [*_red_lines(run), *_commits(run), *_rounds(run), *_vetoes(run)]
    parts += [*_privacy(run), *_dropouts(run)]
    if plots and run.rounds:
        from layerfed.federation.report_plots import federation_plots

        links = federation_plots(run, out / "plots")
        if links:
            parts.append("## Plots")
            parts += [f"![{name}](plots/{path.name})" for name, path in links]
    return "\n\n".join(parts)


def _title(run: RunRecord) -> str:
    load = run.last(AuditKind.POLICY_LOAD) or {}
    done = run.rounds[-1]["round"] if run.rounds else 0
    return (
        f"# layerfed federation report: {load.get('run_id', '?')}\n\n"
        f"Policy {load.get('name', '?')!r} (version {load.get('version', '?')}, hash "
        f"{str(load.get('policy_hash', ''))[:16]}); {done} round(s) complete. Built from "
        "audit.jsonl and metrics.json in this folder; see docs/deployment.md."
    )


def write_federation_report(out: Path) -> tuple[Path, Path]:
    """OUT/report.md and OUT/report.html of a deployed run, from OUT's audit and metrics."""
    run = RunRecord.read(out)
    return write_report(out, _title(run) + "\n\n" + federation_sections(out, run) + "\n")


def round_line(metrics: Mapping[str, Any]) -> str:
    """One line for Flower's log: commits, refusals, vetoes, dropouts, red lines, ε."""
    layers = metrics.get("layers", {})
    committed = sum(int(m.get("slots_committed", 0)) for m in layers.values())
    parts = [
        f"round {metrics.get('round')}: {committed} slot(s) committed",
        f"accepted {_layer_sum(metrics, 'accepted')}",
        f"refused {_layer_sum(metrics, 'refused')}",
        f"vetoes {_layer_sum(metrics, 'vetoes')}",
        f"dropouts {_layer_sum(metrics, 'dropouts')}",
    ]
    worst: dict[str, tuple[float, float]] = {}
    for row in metrics.get("red_lines", []):
        rate, limit = number(row.get("rate")), number(row.get("max_violation_rate"))
        suite = str(row.get("suite"))
        if suite not in worst or rate > worst[suite][0]:
            worst[suite] = (rate, limit)
    for suite, (rate, limit) in worst.items():
        flag = " BREACHED" if rate > limit else ""
        parts.append(f"red line {suite} {rate:.3g} (max {limit:g}){flag}")
    eps = metrics.get("privacy", {}).get("layers", {})
    if eps:
        parts.append("epsilon " + ", ".join(f"{k} {_rate(v)}" for k, v in eps.items()))
    return "; ".join(parts)
