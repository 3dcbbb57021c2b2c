"""`layerfed audit replay RUN_DIR --policy NEW`: what NEW would have done to a finished run.

Arguments and files are checked first; the federation and the base model load only
to replay (:mod:`layerfed.federation.replay`). Output: a table of the changed
decisions (rich), ``--all`` for every kept candidate, ``--json FILE`` for the whole
report and ``--plot FILE.png`` (matplotlib) for decisions by round and slot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from layerfed.federation.replay import ReplayReport

__all__ = ["plot_replay", "replay_command", "replay_table"]

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)
_COLOURS = {
    "committed": "tab:green",
    "clipped": "tab:olive",
    "held": "tab:orange",
    "vetoed": "tab:red",
    "red_line": "tab:purple",
    "skipped": "tab:gray",
    "error": "black",
}


def replay_command(
    run_dir: Annotated[Path, typer.Argument(help="A finished run's output folder.")],
    policy: Annotated[Path, typer.Option("--policy", help="The policy to replay under.")],
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the whole report as JSON here.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a plot (PNG) of decisions here.")
    ] = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="List every kept candidate, not only changes.")
    ] = False,
    device: Annotated[
        str, typer.Option("--device", help="Where the base runs: auto, cpu, cuda, cuda:N, mps.")
    ] = "cpu",
    dtype: Annotated[
        str, typer.Option("--dtype", help="The base's dtype: float32, bfloat16, float16.")
    ] = "float32",
) -> None:
    """Judge RUN_DIR's kept candidates again under --policy; list what would differ.

    Exit 0 whether or not anything differs; 1 on an unreadable run or policy.
    """
    for path, what in ((run_dir, "a run folder"), (policy, "a policy file")):
        if not path.exists():
            err.print(f"{path}: error: expected {what}, got no such file", markup=False)
            raise typer.Exit(1)
    from layerfed.errors import LayerfedError
    from layerfed.governance.loader import load_policy

    try:
        loaded = load_policy(policy)
        from functools import partial

        from layerfed.federation.replay import model_stack, replay_run

        build = partial(model_stack, device=device, dtype=dtype)
        report = replay_run(run_dir, loaded, build)
    except LayerfedError as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(1) from e
    out.print(replay_table(report, show_all=show_all))
    for note in report.notes:
        out.print(f"note: {note}", markup=False)
    changed = len(report.changed)
    out.print(
        f"{run_dir}: {len(report.rows)} kept candidate(s) replayed under {report.policy}; "
        f"{changed} decision(s) differ",
        markup=False,
    )
    if json_file is not None:
        json_file.write_text(json.dumps(report.as_json(), indent=1, sort_keys=True) + "\n")
    if plot is not None:
        plot_replay(report, plot)


def replay_table(report: ReplayReport, *, show_all: bool = False) -> Table:
    """Rows that differ (or all), then final versions and red-line rates."""
    table = Table(title=f"replay of {report.run_id} under {report.policy}")
    slots = [row.slot for row in report.rows] + list(report.versions)
    # Round and slot are what a reader searches for: a slot name is never split across
    # lines (longer composition names in the red-line rows may fold).
    table.add_column("round", no_wrap=True, min_width=5)
    table.add_column("slot", overflow="fold", min_width=max(map(len, slots), default=4))
    for column in ("recorded", "replayed", "why (replayed)"):
        table.add_column(column, overflow="fold")
    for row in report.rows if show_all else report.changed:
        rec, rep = row.recorded, row.replayed
        table.add_row(
            str(row.round),
            row.slot,
            _said(rec.decision, rec.version),
            _said(rep.decision, rep.version),
            "; ".join(rep.reasons) or "-",
        )
    for slot, (a, b) in report.versions.items():
        if a != b:
            table.add_row("end", slot, f"v{a}", f"v{b}", "slot version differs")
    for r in report.red_lines:
        table.add_row(
            "end",
            "+".join(r.composition),
            f"{r.suite} {r.recorded:.3f}",
            f"{r.suite} {r.replayed:.3f}",
            f"red-line rate (max {r.max_rate:g})",
        )
    return table


def _said(decision: str, version: int | None) -> str:
    return f"{decision} v{version}" if version is not None else decision


def plot_replay(report: ReplayReport, path: Path) -> None:
    """Decisions by round (x) and slot (y): recorded (left half) vs replayed (right half)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slots = sorted({r.slot for r in report.rows})
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(report.rows) + 3), 1 + 0.5 * len(slots)))
    for row in report.rows:
        y = slots.index(row.slot)
        for dx, outcome in ((-0.15, row.recorded), (0.15, row.replayed)):
            ax.scatter(
                row.round + dx,
                y,
                s=120,
                color=_COLOURS[outcome.decision],
                edgecolors="black" if row.differs else "none",
                linewidths=1.5,
            )
    for name, colour in _COLOURS.items():
        ax.scatter([], [], color=colour, label=name)
    ax.set_yticks(range(len(slots)), slots)
    ax.set_xlabel("round (left dot: recorded, right dot: replayed; ringed: differs)")
    ax.set_title(f"replay under {report.policy}: {len(report.changed)} change(s)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
