"""`layerfed experiment list|run`: the essay's experiments on Flower's simulation engine."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from layerfed.errors import LayerfedError

if TYPE_CHECKING:
    from layerfed.simulation.base_folder import BaseFolder
    from layerfed.simulation.experiment_spec import ExperimentSpec
    from layerfed.simulation.runner import RunPlan

__all__ = ["DEFAULT_SEEDS", "experiment_app"]

DEFAULT_SEEDS = 11
"""Seeds per arm: the exact two-sided sign-flip test reaches p = 2/2**11 = 0.000977 at best,
below Holm's first threshold 0.05/51 = 0.00098 for a suite of up to 51 predictions (47 since
the cost predictions of issue #25 item 5; layerfed.simulation.stats.min_seeds; 10 seeds
suffice only up to 25, 5 seeds cannot go below 0.0625)."""

experiment_app = typer.Typer(
    help="List and run the gym's experiments (docs/gym.md).", no_args_is_help=True
)
out = Console()
err = Console(stderr=True)


@experiment_app.command("list")
def list_command() -> None:
    """List the experiments: the essay idea each tests, its arms, base and rounds."""
    from layerfed.simulation.experiment_spec import list_experiments

    table = Table("name", "essay idea", "arms", "base", "rounds")
    for spec in list_experiments(check=False):
        rounds = str(spec.scenario.get("rounds", 3))
        arms = ", ".join(a.name for a in spec.arms)
        bases = sorted({a.base or spec.base for a in spec.arms})
        table.add_row(spec.name, spec.essay, arms, ", ".join(bases), rounds)
    out.print(table)


@experiment_app.command("run")
def run_command(
    name: Annotated[
        str, typer.Argument(help="Experiment names (comma-separated), 'all', or a YAML file.")
    ],
    seeds: Annotated[
        int,
        typer.Option(
            help="Seeds per arm (0..K-1); 11 lets the exact tests pass Holm.", min=1, max=50
        ),
    ] = DEFAULT_SEEDS,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("runs/gym"),
    docs: Annotated[
        Path | None, typer.Option(help="Also rewrite the measured-results block of this file.")
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option(help="Run every arm on this local Hugging Face causal-LM folder instead."),
    ] = None,
    scope_map: Annotated[
        str | None,
        typer.Option(help="With --base: a YAML map of policy patterns to the model's, or 'llama'."),
    ] = None,
    device: Annotated[
        str,
        typer.Option(help="Where the server's base runs: auto, cpu, cuda, cuda:N or mps."),
    ] = "cpu",
    dtype: Annotated[
        str, typer.Option(help="The server's base dtype: float32, bfloat16 or float16.")
    ] = "float32",
    instance_device: Annotated[
        str, typer.Option(help="Where the instances' base runs (default: --device).")
    ] = "",
    instance_dtype: Annotated[
        str, typer.Option(help="The instances' base dtype (default: --dtype).")
    ] = "",
    num_gpus: Annotated[
        float,
        typer.Option(help="GPU share per virtual client (-1: auto, 0 on a CPU-only machine)."),
    ] = -1.0,
) -> None:
    """Run experiments, then write OUT/report.md and OUT/report.html (warnings: OUT/gym.log).

    With --base every arm's base is that folder (slower; arms that differ in their base
    lose that contrast); its tokenizer and names are checked first (docs/gym.md).
    """
    from layerfed.simulation.console import quiet_third_party

    log_file = quiet_third_party(out_dir)
    from layerfed.governance.loader import load_policy
    from layerfed.simulation.experiment_spec import list_experiments, load_experiment
    from layerfed.simulation.provenance import write_suite
    from layerfed.simulation.report import write_experiment_report
    from layerfed.simulation.settings import DEFAULT_POLICY

    try:
        specs = _select(name, list_experiments, load_experiment)
        folder = _base(base, scope_map, docs, specs)
        started = time.monotonic()
        placement = {
            "device": device,
            "dtype": dtype,
            "instance_device": instance_device,
            "instance_dtype": instance_dtype,
            "num_gpus": num_gpus,
        }
        results = _run(specs, seeds, out_dir, folder, placement)
        suite = write_suite(out_dir, specs, results, seeds)
        md, page = write_experiment_report(
            out_dir, specs, results, seeds, decay_policy=load_policy(DEFAULT_POLICY)
        )
    except LayerfedError as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(1) from e
    seconds = time.monotonic() - started
    _closing(results, seconds)
    if docs is not None:
        _docs(docs, name, specs, results, seeds, out_dir, seconds, suite)
    out.print(f"report: {md} and {page}; warnings and library logs: {log_file}", markup=False)


@experiment_app.command("report")
def report_command(
    out_dir: Annotated[Path, typer.Argument(help="The output folder of an earlier run.")],
    name: Annotated[str, typer.Option(help="Experiment names (comma-separated) or 'all'.")] = "all",
    seeds: Annotated[
        int, typer.Option(help="Seeds per arm to read.", min=1, max=50)
    ] = DEFAULT_SEEDS,
    docs: Annotated[
        Path | None, typer.Option(help="Also rewrite the measured-results block of this file.")
    ] = None,
) -> None:
    """Summarise the runs already in OUT (verdicts, report, docs) without running anything."""
    from layerfed.governance.loader import load_policy
    from layerfed.simulation.experiment_spec import list_experiments, load_experiment
    from layerfed.simulation.experiments import summarise
    from layerfed.simulation.provenance import write_suite
    from layerfed.simulation.report import write_experiment_report
    from layerfed.simulation.settings import DEFAULT_POLICY

    try:
        specs = [
            s
            for s in _select(name, list_experiments, load_experiment)
            if (out_dir / s.name).is_dir()
        ]
        results = {s.name: summarise(s, out_dir, seeds) for s in specs}
        suite = write_suite(out_dir, specs, results, seeds)
        md, page = write_experiment_report(
            out_dir, specs, results, seeds, decay_policy=load_policy(DEFAULT_POLICY)
        )
    except LayerfedError as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(1) from e
    _closing(results, 0.0)
    if docs is not None:
        _docs(docs, name, specs, results, seeds, out_dir, float("nan"), suite)
    out.print(f"report: {md} and {page}", markup=False)


def _select(name: str, every_fn: Any, load_fn: Any) -> list[ExperimentSpec]:
    if name.endswith((".yaml", ".yml")):
        return [load_fn(name)]
    every: list[ExperimentSpec] = every_fn()
    if name == "all":
        return [s for s in every if s.in_all]
    wanted = [n.strip() for n in name.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in {s.name for s in every}]
    if unknown or not wanted:
        known = ", ".join(s.name for s in every)
        raise LayerfedError(f"experiment: expected names from {known} or 'all', got {name!r}")
    return [s for s in every if s.name in wanted]


def _base(
    base: Path | None, scope_map: str | None, docs: Path | None, specs: Sequence[ExperimentSpec]
) -> BaseFolder | None:
    """The ``--base`` folder (None without); a line for each experiment losing its base contrast."""
    from layerfed.simulation.base_folder import base_folder, lost_contrast

    if base is None:
        if scope_map is not None:
            raise LayerfedError(f"--scope-map: expected it with --base, got {scope_map!r} alone")
        return None
    if docs is not None:
        raise LayerfedError(
            f"--docs: expected it without --base (the docs hold the built-in base's results), "
            f"got --docs {docs} with --base {base}"
        )
    folder = base_folder(base, scope_map)
    out.print(f"base: every arm runs on {folder.path}", markup=False)
    for spec in specs:
        note = lost_contrast(spec, str(folder.path))
        if note:
            out.print(f"warning: {note}", markup=False, soft_wrap=True)
    return folder


def _run(
    specs: Sequence[ExperimentSpec],
    seeds: int,
    out_dir: Path,
    base: BaseFolder | None = None,
    placement: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    from layerfed.simulation.console import RunProgress
    from layerfed.simulation.experiment_spec import arm_scenario_data
    from layerfed.simulation.experiments import run_experiments

    rounds = [
        int(arm_scenario_data(spec, arm, 0).get("rounds", 3)) for spec in specs for arm in spec.arms
    ]
    progress = RunProgress(len(rounds) * seeds, total_weight=sum(rounds) * seeds)
    progress.start("starting Flower's simulation engine")

    def on_run(plan: RunPlan, seconds: float, error: str | None) -> None:
        status = f"failed: {error}" if error else "ok"
        line = f"{plan.experiment} / {plan.arm} / seed {plan.seed}: {seconds:.1f} s {status}"
        progress.advance(line, weight=plan.settings.rounds, failed=error is not None)
        if error and progress.tty:
            err.print(f"\n{line}", markup=False)

    try:
        return run_experiments(specs, seeds, out_dir, on_run, base=base, placement=placement)
    finally:
        progress.close()


def _docs(
    path: Path,
    name: str,
    specs: Sequence[ExperimentSpec],
    results: dict[str, dict[str, Any]],
    seeds: int,
    out_dir: Path,
    seconds: float,
    suite: dict[str, Any] | None = None,
) -> None:
    """Rewrite the measured-results block of ``path`` with this run's verdicts."""
    import datetime
    import os

    from layerfed.simulation.report import results_markdown, update_docs

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    if seconds != seconds:  # NaN: summarised from an earlier run
        header = (
            f"Summarised by `layerfed experiment report {out_dir} --name {name} --seeds {seeds} "
            f"--docs {path}` on {datetime.date.today()} from runs made with "
            f"`layerfed experiment run {name} --seeds {seeds} --out {out_dir}`."
        )
    else:
        header = (
            f"Regenerated by `layerfed experiment run {name} --seeds {seeds} --out {out_dir} "
            f"--docs {path}` on {datetime.date.today()}: {seconds / 60:.1f} min wall clock on "
            f"{os.cpu_count()} cores (load average at the end {load})."
        )
    update_docs(path, results_markdown(specs, results, seeds, header, suite))
    out.print(f"updated the results in {path}", markup=False)


def _closing(results: dict[str, dict[str, Any]], seconds: float) -> None:
    """The closing summary: each experiment's verdicts and how many were supported."""
    verdicts = [v for r in results.values() for v in r.get("verdicts", [])]
    supported = sum(1 for v in verdicts if v["status"] == "supported")
    out.print(
        f"done in {seconds:.0f} s: {supported} of {len(verdicts)} predictions supported "
        "(exact paired tests, Holm-adjusted over all of them)"
    )
    for name, result in results.items():
        for v in result.get("verdicts", []):
            out.print(f"  {name}: {v['text']}", markup=False, soft_wrap=True)
