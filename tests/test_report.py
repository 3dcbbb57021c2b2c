"""Reports: tables with mean and 95% CI, plots, Markdown and HTML."""

from __future__ import annotations

import math
from pathlib import Path

from layerfed.governance.loader import load_policy
from layerfed.simulation.experiments import load_experiment
from layerfed.simulation.metrics import mean_ci
from layerfed.simulation.report import (
    format_stat,
    markdown_table,
    plot_series,
    write_experiment_report,
    write_run_report,
)

ROOT = Path(__file__).resolve().parent.parent
TURKEY = ROOT / "examples" / "scenarios" / "experiments" / "turkey.yaml"


def _arm(values: dict[str, list[float]], label: str = "") -> dict[str, object]:
    return {
        "label": label,
        "values": values,
        "stats": {k: mean_ci(v) for k, v in values.items()},
        "series": {"violation": [[0.5, 0.2, 0.1], [0.4, 0.3, 0.0]]},
    }


def test_format_stat_shows_mean_ci_censoring_and_missing() -> None:
    """Cells read 'mean ± half', '> bound, not reached in k/n' or 'n/a'."""
    assert format_stat(0.25, 0.05) == "0.25 ± 0.05"
    assert format_stat(0.25, 0.0) == "0.25"
    assert format_stat(math.inf, math.nan, [20.0, math.inf]) == "> 20, not reached in 1/2"
    assert format_stat(math.nan, math.nan) == "n/a"


def test_markdown_table_has_a_row_per_arm_and_a_column_per_metric() -> None:
    """The table lists every arm with its label and every metric's cell."""
    arms = {
        "default": _arm({"violation": [0.0, 0.1]}, "governed"),
        "base": _arm({"violation": [0.9]}),
    }
    table = markdown_table(arms, ["violation"]).splitlines()
    assert len(table) == 4
    assert "red-line violation rate" in table[0]
    assert "**default** (governed)" in table[2]
    assert "0.05 [0.0012, 0.69]" in table[2]  # Wilson interval of a rate over 2 seeds
    assert table[3].endswith("| 0.9 |")


def test_plot_series_writes_a_png(tmp_path: Path) -> None:
    """A per-round plot with a band over seeds is written as a PNG file."""
    path = plot_series(
        {"a": [[0.1, 0.2], [0.3, 0.4]], "b": []}, "violation", "t", tmp_path / "p.png"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_experiment_report_links_existing_plots_from_md_and_html(tmp_path: Path) -> None:
    """report.md and report.html name each experiment and link plots that exist."""
    spec = load_experiment(TURKEY)
    values = {k: [0.1, 0.2] for k in spec.metrics}
    results = {
        spec.name: {"arms": {a.name: _arm(values, a.label) for a in spec.arms}, "seconds": 3.0}
    }
    md, page = write_experiment_report(tmp_path, [spec], results, seeds=2)
    text, markup = md.read_text(), page.read_text()
    assert spec.title in text and spec.title in markup
    links = [line[line.index("](") + 2 : -1] for line in text.splitlines() if line.startswith("![")]
    assert links and all((tmp_path / link).is_file() for link in links)
    assert "<table>" in markup and markup.count("<img") == len(links)


def test_run_report_has_a_row_per_round_and_a_decay_plot(tmp_path: Path) -> None:
    """A single run's report has one table row per round and the policy's decay curves."""
    rounds = [
        {
            "round": r,
            "violation": 0.1 * r,
            "false_refusal": 0.0,
            "capability": 0.5,
            "pref_individual": 0.2,
            "leakage": 0.0,
            "vetoes": r,
        }
        for r in (1, 2, 3)
    ]
    policy = load_policy(ROOT / "examples" / "policies" / "default.yaml")
    md, page = write_run_report(tmp_path, rounds, "demo-0", policy)
    rows = [
        line for line in md.read_text().splitlines() if line.startswith("| ") and line[2].isdigit()
    ]
    assert len(rows) == 3
    assert (tmp_path / "plots" / "memory-decay.png").is_file()
    assert "memory-decay.png" in page.read_text()


def test_sections_open_with_question_and_verdict_and_name_policy_and_base(tmp_path: Path) -> None:
    """Each section states question, verdict, factor, and every arm's policy and base."""
    spec = load_experiment(TURKEY)
    values = {k: [0.1, 0.2] for k in spec.metrics}
    arms = {}
    for a in spec.arms:
        arm = _arm(values, a.label)
        arm.update(
            policy=a.policy,
            base_model="tiny",
            base_scores={
                "violation": 0.0,
                "margin": 5.5,
                "false_refusal": 0.01,
                "near_margin": 6.0,
                "capability": 0.9,
            },
        )
        arms[a.name] = arm
    verdict = {"status": "supported", "text": "Supported: governed holds (numbers).", "claim": "c"}
    md, _ = write_experiment_report(
        tmp_path, [spec], {spec.name: {"arms": arms, "verdicts": [verdict]}}, seeds=2
    )
    text = md.read_text()
    section = text[text.index(f"## {spec.title}") :]
    lines = [line for line in section.splitlines() if line.strip()]
    assert lines[1].startswith("**Question.**") and lines[2].startswith("**Verdict.** Supported")
    assert "policy ungoverned, base tiny" in section and "Factor:" in section
    assert "| tiny | 0 | 5.5 |" in text  # the base's starting point


def test_plots_put_legends_outside_and_use_real_rounds(tmp_path: Path) -> None:
    """Legends sit right of the axes; x values are the rounds given (a resumed run's too)."""
    import matplotlib.pyplot as plt

    captured: dict[str, object] = {}
    original = plt.Figure.savefig

    def spy(self: plt.Figure, *args: object, **kwargs: object) -> None:
        ax = self.axes[0]
        captured["x"] = list(ax.lines[0].get_xdata())
        legend = ax.get_legend()
        self.canvas.draw()
        box = legend.get_window_extent()
        captured["outside"] = box.x0 >= ax.get_window_extent().x1
        original(self, *args, **kwargs)

    plt.Figure.savefig = spy  # type: ignore[method-assign]
    try:
        plot_series(
            {"a": [[0.1, 0.2, 0.3]]}, "violation", "t", tmp_path / "p.png", {"a": [[4, 5, 6]]}
        )
    finally:
        plt.Figure.savefig = original  # type: ignore[method-assign]
    assert captured == {"x": [4, 5, 6], "outside": True}


def test_results_block_is_replaced_in_place(tmp_path: Path) -> None:
    """The docs block between the markers is rewritten; text around it is kept."""
    from layerfed.simulation.report import DOCS_END, DOCS_START, update_docs

    doc = tmp_path / "gym.md"
    doc.write_text(f"head\n\n{DOCS_START}\nold\n{DOCS_END}\ntail\n")
    update_docs(doc, "new table")
    assert doc.read_text() == f"head\n\n{DOCS_START}\nnew table\n{DOCS_END}\ntail\n"


def test_run_report_averages_per_group_series(tmp_path: Path) -> None:
    """A run's per-group preference (a mapping by group) is reported as its mean, not a crash."""
    from layerfed.simulation.report import write_run_report

    rows = [
        {"round": 1, "violation": 0.0, "pref_group": {"g1": 0.2, "g2": 0.4}},
        {"round": 2, "violation": 0.1, "pref_group": {"g1": 0.6, "g2": 0.8}},
    ]
    md, _ = write_run_report(tmp_path, rows, "run", None)
    text = md.read_text(encoding="utf-8")
    assert "| 1 |" in text and "| 2 |" in text
