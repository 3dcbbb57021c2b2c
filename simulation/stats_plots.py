"""Kaplan-Meier plots of censored metrics (N50, events to criterion), one curve per arm.

A verdict on a censored metric carries each arm's Kaplan-Meier curve
(:func:`~layerfed.simulation.verdicts.judge`, ``survival``); :func:`plot_survival` draws
them as step functions of the share of runs that have not yet reached the event (the
legend gives each arm's restricted mean and censored runs), with a dashed line at ``tau``
(the restricted means' horizon); :func:`survival_plots` does so for a report section.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["plot_survival", "survival_plots"]


def _steps(
    times: Sequence[float], survival: Sequence[float], end: float
) -> tuple[list[float], list[float]]:
    xs, ys = [0.0], [1.0]
    for t, s in zip(times, survival, strict=True):
        xs += [t, t]
        ys += [ys[-1], s]
    xs.append(max(end, xs[-1]))
    ys.append(ys[-1])
    return xs, ys


def plot_survival(survival: Mapping[str, Any], label: str, title: str, path: Path) -> Path:
    """Each arm's Kaplan-Meier curve of ``survival`` (a verdict's), saved as a PNG."""
    tau = float(survival["tau"])
    fig, ax = plt.subplots(figsize=(7.4, 3.6), dpi=110)
    for name, arm in survival["arms"].items():
        xs, ys = _steps(arm["times"], arm["survival"], tau)
        censored = f", censored {arm['censored']}/{arm['runs']}"
        ax.step(
            xs,
            ys,
            where="post",
            label=f"{name} (restricted mean {arm['restricted_mean']:.3g}{censored})",
        )
    ax.axvline(tau, color="k", linestyle="--", linewidth=0.8, label=f"tau = {tau:g}")
    ax.set_xlabel(textwrap.fill(label, 60), fontsize=8)
    ax.set_ylabel("share of runs not yet there", fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def survival_plots(
    out: Path, spec: Any, verdicts: Sequence[Mapping[str, Any]], labels: Mapping[str, str]
) -> list[str]:
    """A Kaplan-Meier plot under ``out/plots/`` per verdict on a censored metric; its Markdown."""
    lines = []
    for i, verdict in enumerate(verdicts):
        if verdict.get("survival"):
            name = f"plots/{spec.name}-survival-{i}.png"
            label = labels.get(verdict["metric"], verdict["metric"])
            title = f"{spec.title}: {verdict['claim']}"
            plot_survival(verdict["survival"], label, title, out / name)
            lines.append(f"![{spec.name} Kaplan-Meier {verdict['metric']}]({name})")
    return lines
