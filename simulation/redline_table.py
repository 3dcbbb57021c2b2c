"""The red-lines-by-construction table (issue #23 item 5) from the gym's run folders.

Reads ``OUT/NAME/ARM/seed-K/gym.json`` and ``audit.jsonl`` of the ``redline_*``
experiments and gives, per arm, the held-out violations, their costs (false refusals per
near-miss kind, capability, honest people's preference satisfaction: final, at round 1
and over the scored rounds) and how often each
red-line mechanism acted: the gate (``red_line_breach`` audit records: candidates it
refused), the output guard (held-out prompts whose answer it replaced) and the
projection (basis rank per projected module: directions of every slot's A removed).
An arm whose mechanism never acted cannot support a claim about it.

``python -m layerfed.simulation.redline_table OUT [--seeds K]`` prints the Markdown table;
``--base NAME`` instead prints, for a built-in base, how much of each targeted module's
input the ``red_line_refusals`` activations span (:func:`basis_capacity`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from layerfed.simulation import metrics as m
from layerfed.simulation.summaries import number

__all__ = [
    "EXPERIMENTS",
    "arm_values",
    "basis_capacity",
    "finished",
    "markdown",
    "projection_ranks",
    "run_values",
]

EXPERIMENTS = (
    "redline_own_turkey",
    "redline_turkey",
    "redline_n50",
    "redline_own_turkey_no_superego",
    "redline_wide",
    "redline_wide_b100",
    "redline_wide2",
    "redline_wide_suite",
)
"""The experiment files of issue #23 item 5 (``examples/scenarios/experiments/``):
``redline_own_turkey_no_superego`` is exploratory (superego off, decided after the
pre-registered grid); ``redline_wide*`` are pre-registered on the ``tiny-wide`` base,
``redline_wide2`` on ``tiny-wide2`` (a recipe tuned for width 256); ``redline_wide_suite``
on ``tiny-wide2`` with the wider probe suite ``red_line_refusals_wide``."""


def run_values(folder: Path) -> dict[str, float]:
    """One run's numbers: peak and final held-out violations, costs and mechanism counts."""
    gym = json.loads((folder / "gym.json").read_text())
    rows: list[dict[str, Any]] = gym["rounds"]
    last = rows[-1]
    audit = folder / "audit.jsonl"
    kinds: list[str] = []
    if audit.exists():
        kinds = [json.loads(line).get("kind", "") for line in audit.read_text().splitlines()]
    out = {
        "violation_peak": max(number(r, "violation") for r in rows),
        "violation": number(last, "violation"),
        "adversary_peak": max(number(r, "violation_adversary") for r in rows),
        "adversary": number(last, "violation_adversary"),
        "adversary_guarded": number(last, "violation_adversary_guarded"),
        "false_refusal": number(last, "false_refusal"),
        "false_refusal_guarded": number(last, "false_refusal_guarded"),
        "capability": number(last, "capability"),
        "pref_individual": number(last, "pref_individual"),
        "pref_r1": _at_round(rows, "pref_individual", 1),
        "pref_mean": sum(number(r, "pref_individual") for r in rows) / len(rows),
        "pref_prob": number(last, "pref_individual_prob"),
        "pref_prob_r1": _at_round(rows, "pref_individual_prob", 1),
        "pref_prob_mean": sum(number(r, "pref_individual_prob") for r in rows) / len(rows),
        "n50": m.n50([r["attacks"] for r in rows], [r["violation"] for r in rows]),
        "gate_refusals": float(kinds.count("red_line_breach")),
        "vetoes": float(kinds.count("veto")),
        "guard_blocked": number(last, "violation_adversary")
        - number(last, "violation_adversary_guarded"),
        "base_false_refusal": float(gym["base"]["false_refusal"]),
    }
    for kind, rate in last.get("false_refusal_kinds", {}).items():
        out[f"false_refusal_{kind}"] = float(rate)
    return out


def _at_round(rows: Sequence[dict[str, Any]], key: str, round_: int) -> float:
    """``key`` in the row scored at ``round_``; NaN when that round was not scored."""
    return next((number(r, key) for r in rows if int(r["round"]) == round_), math.nan)


def finished(folder: Path) -> bool:
    """Whether the run in ``folder`` scored its last round (its ``scenario.yaml``'s
    ``rounds``); a run stopped part-way, whose ``gym.json`` holds only its first
    rounds, is not. Without ``scenario.yaml`` any ``gym.json`` counts."""
    gym = folder / "gym.json"
    if not gym.exists():
        return False
    scenario = folder / "scenario.yaml"
    if not scenario.exists():
        return True
    rounds = int(yaml.safe_load(scenario.read_text(encoding="utf-8"))["rounds"])
    scored = [int(r["round"]) for r in json.loads(gym.read_text())["rounds"]]
    return bool(scored) and max(scored) >= rounds


def arm_values(out: Path, name: str, arm: str, seeds: int) -> dict[str, list[float]]:
    """Per number, its values over the seeds that ran to the end (others skipped)."""
    runs = [out / name / arm / f"seed-{s}" for s in range(seeds)]
    values = [run_values(r) for r in runs if finished(r)]
    keys = sorted({k for v in values for k in v})
    return {k: [v.get(k, math.nan) for v in values] for k in keys}


def projection_ranks(policy_file: Path) -> dict[str, str]:
    """Per projected module, ``rank/in_features`` of the policy's red-line basis (none: {})."""
    from layerfed.governance.loader import load_policy
    from layerfed.layers.base import load_base
    from layerfed.layers.protect import protection_for

    policy = load_policy(policy_file)
    model, tokenizer = load_base(policy.base_model)
    protection = protection_for(policy, model, tokenizer)
    if protection is None:
        return {}
    return {
        module: f"{basis.rank}/{basis.vectors.shape[0]}"
        for module, basis in sorted(protection.bases.items())
    }


def basis_capacity(base: str, suite: str = "red_line_refusals") -> list[dict[str, Any]]:
    """Per linear module of built-in ``base``: its input width, the rank of the built-in
    ``suite``'s activations (the exact basis) and the directions holding 95%, 99% and 99.99%
    of their energy (the ``energy`` bases): what a projection removes from every A."""
    from layerfed.governance.schema import ProjectionBasis
    from layerfed.layers.base import linear_modules
    from layerfed.layers.builtins import builtin_loader
    from layerfed.layers.protect import collect_activations, module_basis, probe_rows
    from layerfed.simulation import suites

    factories = {
        "red_line_refusals": suites.red_line_refusals,
        "red_line_refusals_wide": suites.red_line_refusals_wide,
    }
    if suite not in factories:
        raise ValueError(f"suite: expected one of {sorted(factories)}, got {suite!r}")
    model, tokenizer = builtin_loader(base)(0)
    rows = probe_rows(tokenizer, factories[suite]())
    modules = sorted(linear_modules(model))
    acts = collect_activations(model, rows, modules)
    return [
        {
            "module": name,
            "inputs": int(acts[name].shape[1]),
            "positions": int(acts[name].shape[0]),
            "exact": module_basis(acts[name], "exact").rank,
            "energy_0.99": module_basis(acts[name], ProjectionBasis(energy=0.99)).rank,
            "energy_0.95": module_basis(acts[name], ProjectionBasis(energy=0.95)).rank,
            "energy_0.9999": module_basis(acts[name], ProjectionBasis(energy=0.9999)).rank,
        }
        for name in modules
    ]


def _cell(values: Sequence[float]) -> str:
    mean, half = m.mean_ci(values)
    if math.isnan(mean):
        return "-"
    if math.isinf(mean):
        return "censored"
    return f"{mean:.3g} ± {half:.2g}" if values and len(values) > 1 else f"{mean:.3g}"


COLUMNS = (
    "violation_peak",
    "adversary_peak",
    "adversary",
    "adversary_guarded",
    "n50",
    "false_refusal",
    "false_refusal_guarded",
    "capability",
    "pref_individual",
    "pref_r1",
    "pref_mean",
    "pref_prob",
    "pref_prob_r1",
    "pref_prob_mean",
    "gate_refusals",
    "vetoes",
    "guard_blocked",
)
"""The table's columns (mean ± 95% CI half-width over seeds). ``pref_r1`` is honest
preference satisfaction at round 1 (NaN unless scored) and ``pref_mean`` its mean over the
scored rounds: off the ceiling that the final round reaches (``redline_wide2``); ``pref_prob*``
are the same readings of the wanted style's mean probability (``pref_individual_prob``),
which is not at 1.0 when the top-1 share is (NaN in runs scored before it existed)."""


def markdown(out: Path, seeds: int, arms: dict[str, list[str]]) -> str:
    """The Markdown table of every listed experiment's arms found under ``out``."""
    head = ["experiment", "arm", "seeds", *COLUMNS, "false refusals by near-miss kind"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, names in arms.items():
        for arm in names:
            values = arm_values(out, name, arm, seeds)
            if not values:
                continue
            n = len(values["violation"])
            kinds = sorted(
                k for k in values if k.startswith("false_refusal_") and k != "false_refusal_guarded"
            )
            by_kind = ", ".join(
                f"{k.removeprefix('false_refusal_')} {_cell(values[k])}" for k in kinds
            )
            cells = [_cell(values[c]) if c in values else "-" for c in COLUMNS]
            lines.append("| " + " | ".join([f"`{name}`", arm, str(n), *cells, by_kind]) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table of the ``redline_*`` experiments under OUT."""
    from layerfed.simulation.experiment_spec import EXPERIMENTS_DIR, load_experiment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--base", help="print a built-in base's basis capacity instead")
    parser.add_argument("--suite", default="red_line_refusals", help="the suite of --base")
    args = parser.parse_args(argv)
    if args.base:
        print(
            "| module | inputs | exact rank | 99.99% energy | 99% energy | 95% energy |\n"
            "| --- | --- | --- | --- | --- | --- |"
        )
        for row in basis_capacity(args.base, args.suite):
            print(
                f"| {row['module']} | {row['inputs']} | {row['exact']} | "
                f"{row['energy_0.9999']} | {row['energy_0.99']} | {row['energy_0.95']} |"
            )
        return
    if args.out is None:
        parser.error("expected OUT (a gym output folder) or --base NAME")
    arms = {
        name: [a.name for a in load_experiment(EXPERIMENTS_DIR / f"{name}.yaml", check=False).arms]
        for name in EXPERIMENTS
    }
    print(markdown(args.out, args.seeds, arms))
    for name, names in arms.items():
        for arm in names:
            policy = args.out / name / arm / "seed-0" / "policy.yaml"
            if policy.exists():
                print(f"{name}/{arm}: basis ranks {projection_ranks(policy) or 'none'}")


if __name__ == "__main__":
    main()
