"""The report's statistical and pre-registration lines (plain text; no plotting, no torch).

:func:`power_lines` states what the seeds allow against Holm's first threshold,
:func:`provenance_lines` the report's pre-registration section (each experiment's
definition digest and the package's, from the runs' ``gym.json``), :func:`digest_lines`
the same in one line below docs/gym.md's results table, :func:`arm_cell` one arm's
table cell with an interval that respects the metric's bounds, :func:`mechanism_cell` the
mechanisms that acted in one round (the run report's per-round table).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from layerfed.simulation.stats import ALPHA, bootstrap_mean, min_seeds, smallest_p, wilson
from layerfed.simulation.stats_survival import kaplan_meier, restricted_mean
from layerfed.simulation.summaries import MECHANISM_COUNTERS, RATES

__all__ = ["arm_cell", "digest_lines", "mechanism_cell", "power_lines", "provenance_lines"]


def power_lines(predictions: int, seeds: int) -> list[str]:
    """What the seeds allow: the smallest attainable p against Holm's first threshold."""
    if not predictions:
        return []
    best, first = smallest_p(seeds), ALPHA / predictions
    line = (
        f"With {seeds} seed(s) the smallest two-sided p is 2/2^{seeds} = {best:.3g}; Holm's "
        f"first threshold over {predictions} prediction(s) is {ALPHA}/{predictions} = "
        f"{first:.3g}"
    )
    if best > first:
        line += f": **no prediction can be supported**; {min_seeds(predictions)} seeds are needed"
    return [line + "."]


def provenance_lines(found: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A pre-registration section: each experiment's definition digest and the package's."""
    if not found:
        return []
    head = [
        "## Pre-registration: what ran",
        "Digests (sha256, first 16 hex) each run recorded in its gym.json: the experiment's "
        "definition (its spec as data, and the shipped file when the spec is that file) "
        "and the package's source files, with the git commit. A changed digest means a "
        "changed prediction or setting: docs/gym.md, Changelog.",
    ]
    rows = [
        "| experiment | spec sha256 | file sha256 | package sha256 | commit | runs |",
        "|" + " --- |" * 6,
    ]
    for name, entry in found.items():
        records = entry.get("records", [])
        runs = f"{entry.get('runs', 0)} stamped, {entry.get('unstamped', 0)} not"
        if not records:
            rows.append(f"| `{name}` | - | - | - | - | {runs} |")
        for r in records:
            commit = str(r.get("git_commit") or "-")[:12]
            if r.get("git_dirty"):
                commit += " (modified)"
            rows.append(
                f"| `{name}` | {str(r.get('spec_sha256', '-'))[:16]} | "
                f"{str(r.get('file_sha256', '-'))[:16]} | {str(r.get('package_sha256', '-'))[:16]} "
                f"| {commit} | {runs} |"
            )
    out = [*head, "\n".join(rows)]
    records = [r for e in found.values() for r in e.get("records", [])]
    if len({r.get("package_sha256") for r in records}) > 1:
        out.append("**Warning:** the runs of this report ran different package versions.")
    if records and records[0].get("versions"):
        versions = ", ".join(f"{k} {v}" for k, v in records[0]["versions"].items())
        out.append(f"Versions: {versions}; CPU: {records[0].get('cpu', '?')}.")
    return out


def digest_lines(found: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line: each experiment's spec digest, then the package digest, commit and versions."""
    records = [r for e in found.values() for r in e.get("records", [])]
    if not records:
        return ["Runs without provenance records (made before digests were recorded)."]
    specs = ", ".join(
        f"`{name}` {str(r.get('spec_sha256', '-'))[:12]}"
        for name, e in found.items()
        for r in e.get("records", [])
    )
    packages = sorted({str(r.get("package_sha256"))[:12] for r in records})
    commits = sorted(
        {
            str(r.get("git_commit") or "no checkout")[:12]
            + (" with modified files" if r.get("git_dirty") else "")
            for r in records
        }
    )
    first = records[0]
    versions = ", ".join(f"{k} {v}" for k, v in (first.get("versions") or {}).items())
    label = "commit" if len(commits) == 1 else "commits"
    return [
        f"Experiment definitions (spec sha256, first 12 hex): {specs}. Package sha256 "
        f"{', '.join(packages)} ({label} {', '.join(commits)}); {versions}; "
        f"CPU {first.get('cpu', '?')}."
    ]


def arm_cell(metric: str, values: Sequence[float], bounds: Sequence[float] = ()) -> str:
    """One arm's table cell: ``mean [95% interval]`` over seeds, bounded where the metric is.

    Rates: Wilson (seeds as trials, never outside [0, 1]); other metrics: BCa bootstrap;
    censored metrics: the Kaplan-Meier restricted mean to the smallest bound and how many
    runs never reached it; one value: the value; none: ``n/a``.
    """
    data = [float(v) for v in values if not math.isnan(v)]
    if not data:
        return "n/a"
    if any(math.isinf(v) for v in data):
        finite_bounds = [b for b in bounds if math.isfinite(b)]
        censored = sum(1 for v in data if math.isinf(v))
        if not finite_bounds:
            return f"not reached in {censored}/{len(data)}"
        tau = min(finite_bounds)
        rmst = restricted_mean(kaplan_meier(values, bounds), tau)
        return f"restricted mean {rmst:.3g} to {tau:g}, not reached in {censored}/{len(data)}"
    mean = sum(data) / len(data)
    if len(data) == 1:
        return f"{mean:.3g}"
    if metric in RATES:
        low, high = wilson(min(1.0, max(0.0, mean)), len(data))
    else:
        low, high = bootstrap_mean(data)
    if low == high:
        return f"{mean:.3g}"
    return f"{mean:.3g} [{low:.2g}, {high:.2g}]"


def mechanism_cell(row: Mapping[str, Any]) -> str:
    """The row's mechanism counters that acted (``name n``; the removed share as a number),
    or ``none``; ``n/a`` for a row that records none (written before they were counted)."""
    if not any(k in row for k in MECHANISM_COUNTERS):
        return "n/a"
    acted = [
        f"{k} {float(row[k]):.3g}"
        for k in MECHANISM_COUNTERS
        if k != "trainings" and float(row.get(k, 0.0)) > 0
    ]
    return ", ".join(acted) if acted else "none"
