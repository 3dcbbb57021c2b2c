"""A federation's record as its report reads it: the out folder's audit.jsonl and metrics.json.

Both files are what the server writes for every host (a deployment's out folder, a
``layerfed simulate`` run's): the hash-chained audit and the per-round metrics of
the signed checkpoints. Reading never fails on a torn last audit line (a run that
is still writing); it is left out. No torch, no Flower: a report can be built
from a copied folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerfed.governance.audit_events import AuditKind

__all__ = ["AUDIT_FILE", "METRICS_FILE", "RunRecord", "number"]

AUDIT_FILE = "audit.jsonl"
METRICS_FILE = "metrics.json"
"""What :class:`~layerfed.federation.server_state.ServerState` writes (named here so the
report reads a folder without loading the server: no torch)."""


def number(value: object) -> float:
    """A metric as a float: None, "inf" or anything unreadable as NaN or inf."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


@dataclass(frozen=True)
class RunRecord:
    """The audit records (``kind``, ``fields``) and the per-round metrics of one run folder."""

    records: tuple[tuple[str, dict[str, Any]], ...]
    rounds: tuple[dict[str, Any], ...]

    @classmethod
    def read(cls, out: Path) -> RunRecord:
        """Read ``out/audit.jsonl`` and ``out/metrics.json`` (either may be missing)."""
        records: list[tuple[str, dict[str, Any]]] = []
        audit = out / AUDIT_FILE
        if audit.is_file():
            for line in audit.read_text(encoding="utf-8").splitlines():
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn tail while the server writes
                if isinstance(raw, dict) and isinstance(raw.get("fields"), dict):
                    records.append((str(raw.get("kind")), raw["fields"]))
        rounds: list[dict[str, Any]] = []
        metrics = out / METRICS_FILE
        if metrics.is_file():
            data = json.loads(metrics.read_text(encoding="utf-8"))
            found = data.get("rounds", []) if isinstance(data, dict) else data
            rounds = [r for r in found if isinstance(r, dict) and "round" in r]
        return cls(tuple(records), tuple(rounds))

    def of(self, kind: AuditKind) -> Iterator[dict[str, Any]]:
        """The fields of every record of ``kind``, in order."""
        return (fields for k, fields in self.records if k == kind.value)

    def last(self, kind: AuditKind) -> dict[str, Any] | None:
        """The fields of the last record of ``kind``, or None."""
        found = None
        for fields in self.of(kind):
            found = fields
        return found

    def breached_at_start(self) -> list[str]:
        """One line per red-line suite over its threshold on the bare base (last start)."""
        start = self.last(AuditKind.RED_LINES_AT_START) or {}
        return [
            f"red line {s.get('suite')} on the base {start.get('base', '')}: violation rate "
            f"{number(s.get('rate')):.3g} vs max {number(s.get('max_violation_rate')):g}: BREACHED"
            + (f" (acknowledged: {s.get('reason')})" if s.get("acknowledged") else "")
            for s in start.get("suites", [])
            if isinstance(s, dict) and s.get("breached")
        ]

    def round(self, number_: int) -> dict[str, Any] | None:
        """The metrics of round ``number_``, or None."""
        return next((r for r in self.rounds if r.get("round") == number_), None)

    def versions(self) -> dict[str, list[tuple[int, int]]]:
        """Slot -> ``(round, version)`` of each commit, in order."""
        out: dict[str, list[tuple[int, int]]] = {}
        for f in self.of(AuditKind.COMMIT):
            out.setdefault(str(f.get("slot")), []).append(
                (int(f.get("round", 0)), int(f.get("version", 0)))
            )
        return dict(sorted(out.items()))

    def red_line_rows(self) -> list[dict[str, Any]]:
        """Per round, each red-line suite's rate per composition (``round`` added to each row).

        Runs from before the per-composition rates fall back to the global composition's
        ``probes`` entry for the red-line suites the start record names.
        """
        start = self.last(AuditKind.RED_LINES_AT_START)
        limits = {
            str(s.get("suite")): number(s.get("max_violation_rate"))
            for s in (start or {}).get("suites", [])
            if isinstance(s, dict)
        }
        rows: list[dict[str, Any]] = []
        for r in self.rounds:
            given = r.get("red_lines")
            if isinstance(given, list):
                rows += [{"round": r["round"], **row} for row in given if isinstance(row, dict)]
                continue
            for suite, limit in limits.items():
                if suite in r.get("probes", {}):
                    rows.append(
                        {
                            "round": r["round"],
                            "composition": ["global slots"],
                            "suite": suite,
                            "rate": r["probes"][suite],
                            "max_violation_rate": limit,
                        }
                    )
        return rows
