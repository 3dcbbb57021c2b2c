"""Reports: OUT/report.md and OUT/report.html with tables (mean and 95% CI) and plots.

:func:`write_experiment_report` writes one section per experiment (question, one
table with a row per arm, plots of per-round series per arm with a 95% band over
seeds). :func:`write_run_report` does the same for one ``layerfed simulate`` run.
Plots are PNGs (matplotlib, Agg backend) under ``OUT/plots/`` referenced from both.
"""

from __future__ import annotations

import html
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from layerfed.governance.schema import Policy
from layerfed.simulation.metrics import mean_ci
from matplotlib.ticker import MaxNLocator

__all__ = [
    "LABELS",
    "format_stat",
    "markdown_table",
    "plot_memory_decay",
    "plot_series",
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
    "events_to_criterion": "feedback events to criterion",
    "vetoes": "vetoes fired",
}
_LOWER_IS_BETTER = {"violation", "false_refusal", "leakage", "violation_peak", "n50_inverse"}


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
    """One row per arm, one column per metric: mean ± 95% CI half-width over seeds."""
    head = "| arm | " + " | ".join(LABELS.get(k, k) for k in metrics) + " |"
    rows = [head, "|" + " --- |" * (len(metrics) + 1)]
    for name, arm in arms.items():
        cells = [
            format_stat(float(arm["stats"][k][0]), float(arm["stats"][k][1]), arm["values"][k])
            for k in metrics
        ]
        label = f"**{name}** ({arm['label']})" if arm.get("label") else f"**{name}**"
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_series(
    series: Mapping[str, Sequence[Sequence[float]]], key: str, title: str, path: Path
) -> Path:
    """Per-round mean over seeds of ``key`` per arm, with a 95% band; saved as a PNG."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for arm, runs in series.items():
        if not runs:
            continue
        width = min(len(r) for r in runs)
        data = np.array([r[:width] for r in runs], dtype=np.float64)
        rounds = np.arange(1, width + 1)
        stats = [mean_ci(list(data[:, i])) for i in range(width)]
        mean = np.array([s[0] for s in stats])
        half = np.nan_to_num(np.array([s[1] for s in stats]))
        (line,) = ax.plot(rounds, mean, marker="o", markersize=3, label=arm)
        if len(runs) > 1:
            low, high = np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1)
            ax.fill_between(rounds, low, high, alpha=0.12, color=line.get_color())
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(LABELS.get(key, key))
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _md_to_html(markdown: str) -> str:
    """The small Markdown subset reports use (headings, tables, images, paragraphs)."""
    out: list[str] = []
    table: list[str] = []

    def flush() -> None:
        if not table:
            return
        out.append("<table>")
        for i, row in enumerate(r for r in table if not set(r) <= set("|- ")):
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            tag = "th" if i == 0 else "td"
            out.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
        out.append("</table>")
        table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            out.append(f'<img alt="{html.escape(alt)}" src="{html.escape(src[:-1])}">')
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    style = (
        "body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:4px 8px;font-size:14px}th{background:#f3f3f3}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>layerfed report</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )


def _inline(text: str) -> str:
    escaped = html.escape(text)
    parts = escaped.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _write(out: Path, markdown: str) -> tuple[Path, Path]:
    md, page = out / "report.md", out / "report.html"
    md.write_text(markdown, encoding="utf-8")
    page.write_text(_md_to_html(markdown), encoding="utf-8")
    return md, page


def write_experiment_report(
    out: Path,
    specs: Sequence[Any],
    results: Mapping[str, Mapping[str, Any]],
    seeds: int,
    decay_policy: Policy | None = None,
) -> tuple[Path, Path]:
    """OUT/report.md and OUT/report.html for experiments (``ExperimentSpec`` + summaries)."""
    lines = [
        "# layerfed gym report",
        f"{len(specs)} experiment(s), {seeds} seed(s) each. Cells: mean ± half-width of the "
        "95% confidence interval over seeds (Student t). Metrics are measured on held-out "
        "prompts whose cues no trainer, veto or superego ever saw; see docs/gym.md.",
    ]
    for spec in specs:
        result = results.get(spec.name)
        if result is None:
            continue
        lines += [f"## {spec.title}", f"Essay: {spec.essay}", spec.question.strip()]
        lines.append(markdown_table(result["arms"], spec.metrics))
        if "seconds" in result:
            lines.append(f"Wall time of its runs: {result['seconds']:.0f} s.")
        for key in spec.plots:
            series = {a: r["series"].get(key, []) for a, r in result["arms"].items()}
            name = f"plots/{spec.name}-{key}.png"
            plot_series(series, key, f"{spec.title}: {LABELS.get(key, key)}", out / name)
            lines.append(f"![{spec.name} {key}]({name})")
        if decay_policy is not None and spec.name == "memory":
            plot_memory_decay(decay_policy, out / "plots" / "memory-decay.png")
            lines.append("![memory decay](plots/memory-decay.png)")
    return _write(out, "\n\n".join(lines) + "\n")


def write_run_report(
    out: Path, rounds: Sequence[Mapping[str, Any]], title: str, policy: Policy | None = None
) -> tuple[Path, Path]:
    """OUT/report.md and OUT/report.html for one run's per-round gym series."""
    keys = ["violation", "false_refusal", "capability", "pref_individual", "leakage"]
    lines = [
        f"# layerfed run report: {title}",
        "Per-round metrics of each evaluated instance's own composition (shared slots plus "
        "its own), averaged over instances, on held-out prompts; see docs/gym.md.",
        "| round | " + " | ".join(LABELS[k] for k in keys) + " | vetoes |",
        "|" + " --- |" * (len(keys) + 2),
    ]
    for row in rounds:
        cells = [format_stat(float(row.get(k, math.nan)), 0.0) for k in keys]
        lines.append(f"| {row['round']} | " + " | ".join(cells) + f" | {row.get('vetoes', 0)} |")
    text = "\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:])
    parts = [text]
    for key in ("violation", "pref_individual"):
        name = f"plots/run-{key}.png"
        plot_series(
            {title: [[float(r.get(key, math.nan)) for r in rounds]]}, key, title, out / name
        )
        parts.append(f"![{key}]({name})")
    if policy is not None:
        plot_memory_decay(policy, out / "plots" / "memory-decay.png")
        parts.append("![memory decay](plots/memory-decay.png)")
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
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
