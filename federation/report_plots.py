"""The federation report's plots (PNGs): versions, red-line rates, participation, ε.

matplotlib loads when a plot is drawn (the Agg backend: no display), not when the
ServerApp starts. Each figure keeps its legend outside the axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from layerfed.atomic import atomic_path
from layerfed.federation.report_data import RunRecord, number

__all__ = ["federation_plots"]


def _figure(title: str, ylabel: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.4, 3.6), dpi=110)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Any, ax: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    if ax.lines:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def _versions(run: RunRecord, path: Path) -> Path | None:
    versions = run.versions()
    if not versions:
        return None
    last = max(int(r["round"]) for r in run.rounds)
    fig, ax = _figure("Committed version of each shared slot", "version")
    for slot, commits in versions.items():
        xs, ys = [0], [0]
        for round_, version in commits:
            xs.append(round_)
            ys.append(version)
        xs.append(last)
        ys.append(ys[-1])
        ax.step(xs, ys, where="post", label=slot)
    return _save(fig, ax, path)


def _red_lines(run: RunRecord, path: Path) -> Path | None:
    rows = run.red_line_rows()
    if not rows:
        return None
    fig, ax = _figure("Red lines: worst composition's violation rate per suite", "violation rate")
    for suite in dict.fromkeys(str(r["suite"]) for r in rows):
        worst: dict[int, float] = {}
        limit = math.nan
        for r in rows:
            if str(r["suite"]) == suite:
                worst[int(r["round"])] = max(worst.get(int(r["round"]), 0.0), number(r["rate"]))
                limit = number(r.get("max_violation_rate"))
        xs = sorted(worst)
        (line,) = ax.plot(xs, [worst[x] for x in xs], marker="o", markersize=3, label=suite)
        if not math.isnan(limit):
            ax.axhline(limit, linestyle="--", color=line.get_color(), label=f"{suite} max")
    ax.set_ylim(-0.02, 1.02)
    return _save(fig, ax, path)


def _counts(run: RunRecord, path: Path) -> Path | None:
    fig, ax = _figure("Replies per round", "replies")
    xs = [int(r["round"]) for r in run.rounds]
    for key in ("accepted", "refused", "dropouts", "no_feedback"):
        ys = []
        for r in run.rounds:
            total = 0
            for layer in r.get("layers", {}).values():
                value = layer.get(key, 0)
                total += sum(value.values()) if isinstance(value, dict) else int(value)
            ys.append(total)
        ax.plot(xs, ys, marker="o", markersize=3, label=key.replace("_", " "))
    return _save(fig, ax, path)


def _epsilon(run: RunRecord, path: Path) -> Path | None:
    layers = sorted({k for r in run.rounds for k in r.get("privacy", {}).get("layers", {})})
    if not layers:
        return None
    fig, ax = _figure("Privacy spent (largest slot epsilon per layer)", "epsilon")
    xs = [int(r["round"]) for r in run.rounds]
    for layer in layers:
        ys = [number(r.get("privacy", {}).get("layers", {}).get(layer)) for r in run.rounds]
        ax.plot(xs, ys, marker="o", markersize=3, label=layer)
    return _save(fig, ax, path)


_PLOTS: tuple[tuple[str, str, Callable[[RunRecord, Path], Path | None]], ...] = (
    ("red lines", "fed-red-lines.png", _red_lines),
    ("versions", "fed-versions.png", _versions),
    ("replies", "fed-replies.png", _counts),
    ("privacy", "fed-epsilon.png", _epsilon),
)


def federation_plots(run: RunRecord, folder: Path) -> list[tuple[str, Path]]:
    """Draw every plot that has data into ``folder``; ``(name, path)`` of each written."""
    out = []
    for name, file, draw in _PLOTS:
        written = draw(run, folder / file)
        if written is not None:
            out.append((name, written))
    return out
