"""`layerfed simulate`: run a simulated federation and say where the results are."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from layerfed.errors import LayerfedError
from layerfed.simulation.experiment_spec import PACKAGE_ROOT

DEFAULT_POLICY = PACKAGE_ROOT / "examples" / "policies" / "default.yaml"
DEFAULT_SCENARIO = PACKAGE_ROOT / "examples" / "scenarios" / "demo.yaml"

__all__ = ["simulate_command"]

out = Console()
err = Console(stderr=True)


def _summary(metrics: dict[str, Any]) -> str:
    layers = metrics.get("layers", {})
    accepted = sum(s["accepted"] for s in layers.values())
    refused = sum(sum(s["refused"].values()) for s in layers.values())
    vetoes = sum(sum(s["vetoes"].values()) for s in layers.values())
    probes = ", ".join(f"{k} {v:.2f}" for k, v in metrics.get("probes", {}).items())
    return f"accepted {accepted}, refused {refused}, vetoes {vetoes}; {probes}"


def simulate_command(
    policy: Annotated[Path, typer.Option(help="Governance policy (YAML/TOML).")] = DEFAULT_POLICY,
    scenario: Annotated[
        Path, typer.Option(help="Scenario file (docs/scenarios.md).")
    ] = DEFAULT_SCENARIO,
    rounds: Annotated[int, typer.Option(help="Rounds (0: the scenario's).", min=0)] = 0,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("runs/demo"),
    resume: Annotated[bool, typer.Option(help="Continue from the last committed round.")] = False,
    seed: Annotated[int, typer.Option(help="Seed (-1: the scenario's).")] = -1,
    root_key: Annotated[
        Path | None, typer.Option(help="Root public key the policy must be signed by.")
    ] = None,
    trusted: Annotated[
        Path | None, typer.Option(help="Previously trusted policy whose signers rule.")
    ] = None,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Run an unsigned policy (research only; audited).")
    ] = False,
    keep_candidates: Annotated[
        int,
        typer.Option(
            help="Keep each slot's judged update of the last N rounds for `audit replay` (0: none).",
            min=0,
        ),
    ] = 0,
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
    """Run a federation on Flower's simulation engine; write metrics, audit log and state."""
    # Settings and scenario first: their errors come before torch, transformers or Flower load.
    from layerfed.simulation.settings import SimSettings

    defaults = SimSettings()
    try:
        settings = SimSettings(
            policy=str(policy),
            scenario=str(scenario),
            out=str(out_dir),
            rounds=rounds,
            seed=seed,
            resume=resume,
            root_key=str(root_key)
            if root_key
            else (defaults.root_key if policy == DEFAULT_POLICY else ""),
            trusted=str(trusted) if trusted else "",
            verify=not no_verify,
            keep_candidates=keep_candidates,
            device=device,
            dtype=dtype,
            instance_device=instance_device,
            instance_dtype=instance_dtype,
            num_gpus=num_gpus,
        )
        if settings.verify and not settings.root_key and not settings.trusted:
            err.print(
                "error: name --root-key or --trusted to verify the policy, or pass --no-verify"
            )
            raise typer.Exit(1)
        settings = settings.resolved()
    except LayerfedError as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(1) from e
    from layerfed.simulation.console import quiet_third_party
    from layerfed.simulation.evaluate import RunEvaluator
    from layerfed.simulation.report import write_run_report
    from layerfed.simulation.simulate import simulate

    log_file = quiet_third_party(settings.out_dir)
    from layerfed.simulation.checks import layer_mismatches

    for note in layer_mismatches(settings.load_policy(), settings.load_scenario()):
        err.print(f"warning: {note}", markup=False)
    columns = (
        TextColumn("round"),
        MofNCompleteColumn(),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(
        *columns, console=out, disable=not out.is_terminal
    ) as progress:  # piped: lines only
        task = progress.add_task("starting Flower's simulation engine", total=settings.rounds)

        evaluator = RunEvaluator(settings)

        def on_round(metrics: dict[str, Any]) -> None:
            evaluator.on_round(metrics)
            progress.update(task, completed=metrics["round"], description=_summary(metrics))
            progress.console.print(f"round {metrics['round']}: {_summary(metrics)}", markup=False)

        try:
            state = simulate(settings, on_round=on_round)
        except LayerfedError as e:
            err.print(f"error: {e}", markup=False)
            raise typer.Exit(1) from e
    results = settings.out_dir
    write_run_report(results, evaluator.series, settings.run_id, settings.load_policy())
    from layerfed.federation.report_data import RunRecord

    for line in RunRecord.read(results).breached_at_start():  # the gym warns, never refuses
        err.print(f"warning: {line}", style="yellow", markup=False, soft_wrap=True)
    out.print(f"done: {state.round} rounds, state digest {state.digest()[:16]}")
    out.print(_closing(evaluator.series), markup=False)
    out.print(
        f"results in {results}: report.md, report.html, gym.json, metrics.json, audit.jsonl,"
        f" state/; warnings and library logs: {log_file}",
        markup=False,
    )


def _closing(series: list[dict[str, Any]]) -> str:
    """What the run shows, first round against last, on held-out prompts."""
    if not series:
        return "no rounds were evaluated"
    first, last = series[0], series[-1]

    def pair(key: str) -> str:
        return f"{first.get(key, float('nan')):.2f} -> {last.get(key, float('nan')):.2f}"

    vetoes = sum(int(r.get("vetoes", 0)) for r in series)
    return (
        f"rounds {first['round']}-{last['round']} on held-out prompts: red-line violations "
        f"{pair('violation')}, false refusals {pair('false_refusal')}, capability "
        f"{pair('capability')}, own-style satisfaction {pair('pref_individual')}, leakage "
        f"{pair('leakage')}; {vetoes} update(s) vetoed"
    )
