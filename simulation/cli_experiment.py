"""`layerfed experiment list|run`: the essay's experiments on Flower's simulation engine."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from layerfed.errors import LayerfedError

if TYPE_CHECKING:
    from layerfed.simulation.experiments import ExperimentSpec
    from layerfed.simulation.runner import RunPlan

__all__ = ["experiment_app"]

experiment_app = typer.Typer(
    help="List and run the gym's experiments (docs/gym.md).", no_args_is_help=True
)
out = Console()
err = Console(stderr=True)


@experiment_app.command("list")
def list_command() -> None:
    """List the experiments with their arms and the essay idea each tests."""
    from layerfed.simulation.experiments import list_experiments

    table = Table("name", "arms", "rounds", "title")
    for spec in list_experiments():
        rounds = str(spec.scenario.get("rounds", 3))
        arms = ", ".join(a.name for a in spec.arms)
        table.add_row(spec.name, arms, rounds, spec.title)
    out.print(table)


@experiment_app.command("run")
def run_command(
    name: Annotated[str, typer.Argument(help="An experiment name, 'all', or a YAML file.")],
    seeds: Annotated[int, typer.Option(help="Seeds per arm (0..K-1).", min=1, max=50)] = 3,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("runs/gym"),
) -> None:
    """Run experiments, then write OUT/report.md and OUT/report.html."""
    from layerfed.governance.loader import load_policy
    from layerfed.simulation.experiments import list_experiments, load_experiment
    from layerfed.simulation.report import write_experiment_report
    from layerfed.simulation.settings import DEFAULT_POLICY

    for noisy in ("flwr", "ray", "alembic"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        every = list_experiments()
        if name == "all":
            specs = every
        elif name.endswith((".yaml", ".yml")):
            specs = [load_experiment(name)]
        else:
            specs = [s for s in every if s.name == name]
            if not specs:
                known = ", ".join(s.name for s in every)
                raise LayerfedError(f"experiment: expected one of {known} or 'all', got {name!r}")
        started = time.monotonic()
        results = _run(specs, seeds, out_dir)
        md, page = write_experiment_report(
            out_dir, specs, results, seeds, decay_policy=load_policy(DEFAULT_POLICY)
        )
    except LayerfedError as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(1) from e
    out.print(f"done in {time.monotonic() - started:.0f} s: {md} and {page}", markup=False)


def _run(specs: Sequence[ExperimentSpec], seeds: int, out_dir: Path) -> dict[str, dict[str, Any]]:
    from layerfed.simulation.experiments import run_experiments

    def on_run(plan: RunPlan, seconds: float, error: str | None) -> None:
        status = f"failed: {error}" if error else "ok"
        out.print(f"{plan.experiment} / {plan.arm} / seed {plan.seed}: {seconds:.1f} s {status}")

    return run_experiments(specs, seeds, out_dir, on_run)
