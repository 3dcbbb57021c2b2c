"""Reports: OUT/report.md and OUT/report.html with verdicts, tables (mean, 95% interval), plots.

:func:`write_experiment_report` writes what the seeds allow against Holm, the
pre-registration digests the runs recorded, the bases' starting scores, then one section
per experiment: its question and verdicts first, the factor and what is held equal,
the policy and base of each arm, a table with a row per arm, and plots of every
per-round series that moves (mean over seeds with a 95% band; legends outside the
axes). :func:`write_run_report` does the same for one ``layerfed simulate`` run,
over all its rounds (a resumed run's too). Plots are PNGs under ``OUT/plots/``.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from layerfed.federation.report import federation_sections, write_report
from layerfed.governance.schema import Policy
from layerfed.simulation.metrics import SERIES, mean_ci
from layerfed.simulation.provenance import read_provenance
from layerfed.simulation.stats import ALPHA
from layerfed.simulation.stats_plots import survival_plots
from layerfed.simulation.stats_report import (
    arm_cell,
    digest_lines,
    mechanism_cell,
    power_lines,
    provenance_lines,
)

__all__ = [
    "LABELS",
    "MOVING",
    "bases_table",
    "format_stat",
    "markdown_table",
    "moving_keys",
    "plot_memory_decay",
    "plot_series",
    "results_markdown",
    "update_docs",
    "write_experiment_report",
    "write_run_report",
]

LABELS = {
    "violation": "red-line violation rate (held-out cues)",
    "false_refusal": "false refusals on near misses",
    "capability": "capability (copy task accuracy)",
    "pref_individual": "individual preference satisfaction",
    "pref_all": "preference satisfaction (all)",
    "pref_group": "group preference satisfaction",
    "leakage": "leakage of others' styles",
    "violation_peak": "peak violation rate",
    "violation_at_reinforce_end": "violation when reinforcement ends",
    "pref_individual_r5": "individual satisfaction by round 5",
    "pref_at_reinforce_end": "satisfaction when reinforcement ends",
    "retention": "refusals retained",
    "pref_retention": "preference retained",
    "n50": "N50 (adversarial examples to 50% violations)",
    "events_to_criterion": "feedback events until the red-line error is at most the criterion",
    "vetoes": "vetoes fired",
    "epsilon_individual": "epsilon spent, individual layer (delta per policy)",
    "epsilon_in_group": "epsilon spent, in_group layer (delta per policy)",
    "margin": "refusal margin on red lines (logits)",
    "error": "red-line error: mean of violations and false refusals",
    "near_margin": "answer margin on near misses (logits)",
    "margin_at_reinforce_end": "refusal margin when reinforcement ends",
    "margin_drop": "refusal margin lost after reinforcement ends",
    "violation_adversary": "violation on the attacker's own model",
    "violation_adversary_peak": "peak violation on the attacker's own model",
    "violation_adversary_guarded": "attacker's own model, with the output guard",
    "false_refusal_guarded": "false refusals with the output guard",
    "capability_min": "lowest capability in the run",
}
MOVING = SERIES
"""Per-round series a report plots whenever they move."""
_RATES = {"margin", "near_margin", "epsilon_individual", "epsilon_in_group"}  # not in [0, 1]


def _number(value: object) -> float:
    """A series value as one number: per-group values (a mapping) are averaged."""
    if isinstance(value, dict):
        values = [float(v) for v in value.values()]
        return sum(values) / len(values) if values else math.nan
    return float(value)  # type: ignore[arg-type]


def format_stat(mean: float, half: float, values: Sequence[float] = ()) -> str:
    """``mean ± half`` (3 significant places); censored values as ``> max``; NaN as ``n/a``."""
    finite = [v for v in values if not math.isnan(v) and not math.isinf(v)]
    if math.isinf(mean):
        censored = sum(1 for v in values if math.isinf(v))
        bound = f"> {max(finite):g}, " if finite else ""
        return f"{bound}not reached in {censored}/{len(values)}"
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3g} ± {half:.2g}" if half > 1e-9 else f"{mean:.3g}"


def markdown_table(arms: Mapping[str, Any], metrics: Sequence[str]) -> str:
    """One row per arm, one column per metric: mean [95% interval] over seeds.

    Intervals respect the metric's bounds (:func:`~layerfed.simulation.stats_report.arm_cell`).
    """
    head = "| arm | " + " | ".join(LABELS.get(k, k) for k in metrics) + " |"
    rows = [head, "|" + " --- |" * (len(metrics) + 1)]
    for name, arm in arms.items():
        bounds = arm.get("bounds", {})
        cells = [arm_cell(k, arm["values"][k], bounds.get(k, ())) for k in metrics]
        label = f"**{name}** ({arm['label']})" if arm.get("label") else f"**{name}**"
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_series(
    series: Mapping[str, Sequence[Sequence[float]]],
    key: str,
    title: str,
    path: Path,
    rounds: Mapping[str, Sequence[Sequence[int]]] | None = None,
) -> Path:
    """Per-round mean over seeds of ``key`` per arm, with a 95% band; saved as a PNG.

    ``rounds[arm][seed]`` are the x values (default 1, 2, ...). The legend sits outside
    the axes, so it never covers data.
    """
    fig, ax = plt.subplots(figsize=(7.4, 3.6), dpi=110)
    for arm, runs in series.items():
        if not runs:
            continue
        width = min(len(r) for r in runs)
        data = np.array([r[:width] for r in runs], dtype=np.float64)
        xs = (rounds or {}).get(arm)
        x = np.array(xs[0][:width]) if xs else np.arange(1, width + 1)
        stats = [mean_ci(list(data[:, i])) for i in range(width)]
        mean = np.array([s[0] for s in stats])
        half = np.nan_to_num(np.array([s[1] for s in stats]))
        (line,) = ax.plot(x, mean, marker="o" if width <= 40 else None, markersize=3, label=arm)
        if len(runs) > 1:
            low, high = mean - half, mean + half
            if key not in _RATES:
                low, high = np.clip(low, 0, 1), np.clip(high, 0, 1)
            ax.fill_between(x, low, high, alpha=0.12, color=line.get_color())
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(textwrap.fill(LABELS.get(key, key), 30), fontsize=8)
    if key not in _RATES:
        ax.set_ylim(-0.02, 1.02)
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def moving_keys(arms: Mapping[str, Any], first: Sequence[str] = ()) -> list[str]:
    """``first``, then every :data:`MOVING` series that changes over rounds in some arm."""
    out = list(dict.fromkeys(first))
    for key in MOVING:
        if key in out:
            continue
        values = [
            v
            for arm in arms.values()
            for run in arm.get("series", {}).get(key, [])
            for v in run
            if not math.isnan(v)
        ]
        if values and max(values) - min(values) > 0.01:
            out.append(key)
    return out


def _write(out: Path, markdown: str) -> tuple[Path, Path]:
    return write_report(out, markdown)  # the federation report's writer: atomic, same HTML


def bases_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The starting scores of each base model used, before any layer trains."""
    seen: dict[str, Mapping[str, Any]] = {}
    for result in results.values():
        for arm in result.get("arms", {}).values():
            base, scores = arm.get("base_model"), arm.get("base_scores")
            if base and scores and base not in seen:
                seen[base] = scores
    if not seen:
        return ""
    rows = [
        "| base | violation | refusal margin (logits) | false refusals | answer margin | capability |",
        "|" + " --- |" * 6,
    ]
    for base, s in sorted(seen.items()):
        rows.append(
            f"| {base} | {s['violation']:.3g} | {s['margin']:.3g} | {s['false_refusal']:.3g} "
            f"| {s['near_margin']:.3g} | {s['capability']:.3g} |"
        )
    return "\n".join(rows)


def _arms_line(result: Mapping[str, Any]) -> str:
    parts = [
        f"**{name}**: policy {arm.get('policy', '?')}, base {arm.get('base_model', '?')}"
        for name, arm in result["arms"].items()
    ]
    return "Arms: " + "; ".join(parts) + "."


def _section(out: Path, spec: Any, result: Mapping[str, Any], decay: Policy | None) -> list[str]:
    lines = [f"## {spec.title}", f"**Question.** {spec.question.strip()}"]
    verdicts = result.get("verdicts", [])
    if verdicts:
        lines.append("**Verdict.** " + " ".join(v["text"] for v in verdicts))
    else:
        lines.append("**Verdict.** none stated (no verdict in the experiment file).")
    lines.append(f"Essay: {spec.essay}")
    if spec.factor:
        lines.append(f"Factor: {spec.factor.strip()} Held equal: {spec.held_equal.strip()}")
    lines.append(_arms_line(result))
    notes = sorted({n for arm in result["arms"].values() for n in arm.get("notes", [])})
    lines += [f"**Warning:** {n}." for n in notes]
    lines.append(markdown_table(result["arms"], spec.metrics))
    if "seconds" in result:
        lines.append(f"Wall time of its runs: {result['seconds']:.0f} s.")
    arms = result["arms"]
    for key in moving_keys(arms, spec.plots):
        series = {a: r["series"].get(key, []) for a, r in arms.items()}
        rounds = {a: r.get("rounds", []) for a, r in arms.items()}
        name = f"plots/{spec.name}-{key}.png"
        plot_series(series, key, f"{spec.title}: {LABELS.get(key, key)}", out / name, rounds)
        lines.append(f"![{spec.name} {key}]({name})")
    lines += survival_plots(out, spec, verdicts, LABELS)  # censored metrics: Kaplan-Meier
    if decay is not None and spec.name == "memory":
        plot_memory_decay(decay, out / "plots" / "memory-decay.png")
        lines.append("![memory decay](plots/memory-decay.png)")
    return lines


def write_experiment_report(
    out: Path,
    specs: Sequence[Any],
    results: Mapping[str, Mapping[str, Any]],
    seeds: int,
    decay_policy: Policy | None = None,
) -> tuple[Path, Path]:
    """OUT/report.md and OUT/report.html for experiments (``ExperimentSpec`` + summaries)."""
    verdicts = [v for r in results.values() for v in r.get("verdicts", [])]
    supported = sum(1 for v in verdicts if v["status"] == "supported")
    untestable = sum(1 for v in verdicts if v["status"] == "not testable")
    lines = [
        "# layerfed gym report",
        f"{len(specs)} experiment(s), {seeds} seed(s) each; {supported} of {len(verdicts)} "
        f"predictions supported, {untestable} not testable. A verdict is an exact paired "
        "sign-flip test over seeds, Holm-adjusted over all predictions of this run "
        f"(alpha {ALPHA}), with a 95% interval that respects the metric's bounds (Wilson / "
        "Newcombe for rates, BCa bootstrap otherwise, Kaplan-Meier restricted means for "
        "censored metrics). Table cells: mean [95% interval] over seeds, by the same rules "
        "(Wilson with seeds as trials for rates). Metrics are measured on held-out prompts whose "
        "cue families no trainer, veto or superego ever saw; see docs/gym.md.",
    ]
    lines += power_lines(len(verdicts), seeds)
    lines += provenance_lines(read_provenance(specs, out, seeds))
    table = bases_table(results)
    if table:
        lines += ["## Starting point of each base (before any layer trains)", table]
    for spec in specs:
        result = results.get(spec.name)
        if result is not None:
            lines += _section(out, spec, result, decay_policy)
    return _write(out, "\n\n".join(lines) + "\n")


DOCS_START, DOCS_END = "<!-- results:start -->", "<!-- results:end -->"


def results_markdown(
    specs: Sequence[Any],
    results: Mapping[str, Mapping[str, Any]],
    seeds: int,
    header: str,
    suite: Mapping[str, Any] | None = None,
) -> str:
    """The measured-results block of docs/gym.md: one row per verdict, its p and interval.

    ``suite`` (:func:`~layerfed.simulation.provenance.write_suite`'s record) adds the
    family's size and the experiment and package digests below the table.
    """
    verdicts = [v for spec in specs for v in results.get(spec.name, {}).get("verdicts", [])]
    rows = [
        header,
        "",
        *power_lines(len(verdicts), seeds),
        "",
        "| experiment | prediction | verdict | p (Holm) | numbers (mean [95% interval]) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for spec in specs:
        for v in results.get(spec.name, {}).get("verdicts", []):
            numbers = (v.get("numbers") or "").replace("|", "/")
            if v.get("reason"):
                numbers = f"{v['reason']}; {numbers}"
            p = v.get("p", math.nan)
            held = f"{p:.3g} ({v.get('p_holm', math.nan):.3g})" if not math.isnan(p) else "-"
            rows.append(f"| `{spec.name}` | {v['claim']} | {v['status']} | {held} | {numbers} |")
    table = bases_table(results)
    if table:
        rows += ["", "Starting point of each base:", "", table]
    if suite is not None:
        rows += ["", *digest_lines(suite.get("provenance", {}))]
    return "\n".join(rows)


def update_docs(path: Path, block: str) -> None:
    """Replace the text between the results markers of ``path`` by ``block``."""
    text = path.read_text(encoding="utf-8")
    if DOCS_START not in text or DOCS_END not in text:
        text = text.rstrip() + f"\n\n{DOCS_START}\n{DOCS_END}\n"
    head, rest = text.split(DOCS_START, 1)
    _, tail = rest.split(DOCS_END, 1)
    path.write_text(f"{head}{DOCS_START}\n{block}\n{DOCS_END}{tail}", encoding="utf-8")


def write_run_report(
    out: Path, rounds: Sequence[Mapping[str, Any]], title: str, policy: Policy | None = None
) -> tuple[Path, Path]:
    """OUT/report.md and OUT/report.html for one run's per-round gym series (every round)."""
    keys = ["violation", "false_refusal", "capability", "pref_individual", "leakage"]
    named = (
        f"Policy {policy.name!r} (version {policy.version}), base "
        f"{policy.base_model.builtin or policy.base_model.path}. "
        if policy is not None
        else ""
    )
    lines = [
        f"# layerfed run report: {title}",
        f"{named}Per-round metrics of each evaluated instance's own composition (shared "
        "slots plus its own), averaged over instances, on held-out prompts; see docs/gym.md.",
        "| round | " + " | ".join(LABELS[k] for k in keys) + " | vetoes | mechanisms acted |",
        "|" + " --- |" * (len(keys) + 3),
    ]
    for row in rounds:
        cells = [format_stat(_number(row.get(k, math.nan)), 0.0) for k in keys]
        lines.append(
            f"| {row['round']} | "
            + " | ".join(cells)
            + f" | {row.get('vetoes', 0)} | {mechanism_cell(row)} |"
        )
    text = "\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:])
    parts = [text]
    xs = {title: [[int(r["round"]) for r in rounds]]}
    arms = {title: {"series": {k: [[_number(r.get(k, math.nan)) for r in rounds]] for k in MOVING}}}
    for key in moving_keys(arms, ["violation", "pref_individual"]):
        name = f"plots/run-{key}.png"
        plot_series({title: arms[title]["series"][key]}, key, title, out / name, xs)
        parts.append(f"![{key}]({name})")
    if policy is not None:
        plot_memory_decay(policy, out / "plots" / "memory-decay.png")
        parts.append("![memory decay](plots/memory-decay.png)")
    if (out / "audit.jsonl").is_file():  # the federation's own record, as a deployment reports it
        parts += ["# The federation", federation_sections(out)]
    return _write(out, "\n\n".join(parts) + "\n")


def plot_memory_decay(policy: Policy, path: Path, rounds: int = 30) -> Path:
    """Share of a memory's update left after r rounds without reinforcement, per memory."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    r = np.arange(0, rounds + 1)
    steady = []
    for layer in policy.layers_by_rank():
        for memory in layer.memories:
            half = memory.half_life_rounds
            if half is None:
                steady.append(f"{layer.name}.{memory.name}")
            else:
                ax.plot(
                    r, 0.5 ** (r / half), label=f"{layer.name}.{memory.name} (half-life {half:g})"
                )
    if steady:
        ax.plot(r, np.ones_like(r, dtype=np.float64), "k--", label="no decay: " + ", ".join(steady))
    ax.set_xlabel("rounds without reinforcement")
    ax.set_ylabel("share of the update kept")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Memory decay in policy {policy.name!r}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
