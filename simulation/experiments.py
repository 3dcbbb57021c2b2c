"""Running the essay's experiments over seeds and summarising them per arm, with verdicts.

Experiment files are read by :mod:`layerfed.simulation.experiment_spec` (re-exported
here). :func:`plan_experiment` writes each run's scenario and policy (patched, with the
arm's base model) under ``OUT/NAME/ARM/seed-K/``; :func:`run_experiments` runs every
run inside one Flower simulation and :func:`summarise` reduces each run's per-round
series (``gym.json``) to the experiment's metrics and verdicts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from layerfed.simulation import metrics as m
from layerfed.simulation.base_folder import BaseFolder, base_notes, check_base_folder
from layerfed.simulation.checks import fed_layers, layer_mismatches
from layerfed.simulation.evaluate import GYM_FILE, RunEvaluator
from layerfed.simulation.experiment_spec import (
    EXPERIMENTS_DIR,
    POLICIES,
    ArmSpec,
    ExperimentError,
    ExperimentSpec,
    arm_scenario_data,
    deep_merge,
    list_experiments,
    load_experiment,
)
from layerfed.simulation.provenance import stamp_runs
from layerfed.simulation.runner import RunPlan, run_plans
from layerfed.simulation.scenario import Scenario
from layerfed.simulation.settings import DEFAULT_ROOT_KEY, PACKAGE_ROOT, SimSettings
from layerfed.simulation.summaries import CENSOR_BOUNDS, SUMMARIES, mechanism_totals, number
from layerfed.simulation.verdicts import judge

__all__ = [
    "EXPERIMENTS_DIR",
    "POLICIES",
    "SUMMARIES",
    "ArmSpec",
    "ExperimentError",
    "ExperimentSpec",
    "deep_merge",
    "list_experiments",
    "load_experiment",
    "plan_experiment",
    "run_experiments",
    "summarise",
    "warm_protection",
]

log = logging.getLogger("layerfed")


def _arm_policy(
    spec: ExperimentSpec, arm: ArmSpec, folder: BaseFolder | None = None
) -> tuple[Path, dict[str, Any]]:
    """The arm's policy file and its patch (the base model included when it differs)."""
    path = POLICIES.get(arm.policy, PACKAGE_ROOT / arm.policy)
    base = arm.base or spec.base
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    patch = dict(arm.policy_patch)
    if folder is not None:
        patch["base_model"] = {"path": str(folder.path)}
    elif data.get("base_model") != {"builtin": base}:
        patch["base_model"] = {"builtin": base}
    return path, patch


def plan_experiment(
    spec: ExperimentSpec,
    seeds: int,
    out: Path,
    base: BaseFolder | None = None,
    placement: Mapping[str, Any] | None = None,
) -> list[RunPlan]:
    """Write each run's scenario (and patched policy) and return the plans, arm-major.

    ``base``: every arm runs on that local Hugging Face folder, its policy's scope and
    red-line patterns mapped onto the folder's names (:mod:`~layerfed.simulation.base_folder`).
    ``placement``: device settings of every run (``device``, ``dtype``, ``instance_device``,
    ``instance_dtype``, ``num_gpus`` of :class:`SimSettings`); none: the defaults.
    """
    plans = []
    for arm in spec.arms:
        base_policy, patch = _arm_policy(spec, arm, base)
        signed = not patch
        for seed in range(seeds):
            folder = out / spec.name / arm.name / f"seed-{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            scenario = Scenario.model_validate(arm_scenario_data(spec, arm, seed))
            scenario_file = folder / "scenario.yaml"
            scenario_file.write_text(yaml.safe_dump(scenario.model_dump(mode="json")))
            policy_file = base_policy
            if not signed:
                data = deep_merge(yaml.safe_load(base_policy.read_text(encoding="utf-8")), patch)
                policy_file = folder / "policy.yaml"
                policy_file.write_text(yaml.safe_dump(base.policy_data(data) if base else data))
            settings = SimSettings(
                policy=str(policy_file),
                scenario=str(scenario_file),
                out=str(folder),
                seed=seed,
                run_id=f"{spec.name}-{arm.name}-s{seed}",
                root_key=str(DEFAULT_ROOT_KEY),
                verify=signed,
                **dict(placement or {}),
            ).resolved()
            plans.append(RunPlan(spec.name, arm.name, seed, settings))
    return plans


def run_experiments(
    specs: Sequence[ExperimentSpec],
    seeds: int,
    out: Path,
    on_run: Callable[[RunPlan, float, str | None], None] | None = None,
    parallel: int | None = None,
    base: BaseFolder | None = None,
    placement: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every experiment's runs inside one Flower simulation; return and write summaries.

    ``parallel`` runs go at once (:func:`~layerfed.simulation.runner.run_plans`). With
    ``base`` every arm runs on that folder, checked first (:func:`check_base_folder`).
    """
    plans = [plan for spec in specs for plan in plan_experiment(spec, seeds, out, base, placement)]
    if base is not None:
        check_base_folder(base, plans)
    plans.sort(key=lambda p: p.settings.rounds)  # long runs last: early results come early
    first: dict[str, RunPlan] = {}
    copies: list[tuple[RunPlan, RunPlan]] = []
    for plan in plans:
        key = run_key(plan)
        if key in first:
            copies.append((plan, first[key]))
        else:
            first[key] = plan
    timings: dict[str, tuple[float, float]] = {}
    warm_protection(list(first.values()))
    run_plans(list(first.values()), partial(_done, timings, on_run), parallel=parallel)
    for copy, source in copies:  # an arm that two experiments share runs once
        for name in (GYM_FILE, "metrics.json"):
            if (source.settings.out_dir / name).exists():
                shutil.copyfile(source.settings.out_dir / name, copy.settings.out_dir / name)
        (copy.settings.out_dir / "same_as.txt").write_text(f"{source.settings.out_dir}\n")
        if on_run is not None:
            on_run(copy, 0.0, None)
    stamp_runs(specs, out, seeds)  # pre-registration: experiment and package digests
    results: dict[str, dict[str, Any]] = {}
    for spec in specs:
        results[spec.name] = summarise(spec, out, seeds)
        mine = [t for run_id, t in timings.items() if run_id.startswith(f"{spec.name}-")]
        results[spec.name]["seconds"] = sum(wall for wall, _ in mine)
        results[spec.name]["evaluation_cpu_seconds"] = sum(cpu for _, cpu in mine)
        path = out / spec.name / "summary.json"
        path.write_text(json.dumps(results[spec.name], indent=1, default=_json_default))
    return results


def warm_protection(plans: Sequence[RunPlan]) -> int:
    """Build each projected policy's red-line bases once, here, before any lane starts.

    A run whose policy projects (``red_lines.probes[].protect``: ``projection`` or
    ``both``) needs the bases in its server, evaluator and clients; built here they are
    in this process's memo and the disk cache, so no lane computes them. Returns how many
    distinct bases were built or loaded.

    Added against a hang (a float64 SVD built inside a lane thread ran for over ten
    minutes on 2 loaded cores), whose cause is fixed in :mod:`layerfed.layers.protect`
    (one BLAS thread per SVD; ``tests/test_protect_threads.py``). Kept because nothing
    else builds a basis once per experiment run: the per-process memo and an unlocked
    disk cache would let every lane, evaluator and Ray worker that starts before the
    first write build the same basis again.
    """
    from layerfed.layers.base import load_base
    from layerfed.layers.protect import projected_probes, protection_for

    seen: set[str] = set()
    for plan in plans:
        policy = plan.settings.load_policy()
        probes = projected_probes(policy)
        if not probes:
            continue
        key = json.dumps(
            [
                policy.base_model.model_dump(mode="json"),
                [p.model_dump(mode="json") for p in probes],
            ],
            sort_keys=True,
        )
        if key in seen:
            continue
        seen.add(key)
        model, tokenizer = load_base(policy.base_model)
        protection_for(policy, model, tokenizer)
    return len(seen)


def run_key(plan: RunPlan) -> str:
    """What decides a run's numbers: its policy, its scenario without the name, its seed.

    Two plans with the same key (an arm that two experiments share) give the same numbers.
    """
    settings = plan.settings
    scenario = yaml.safe_load(Path(settings.scenario).read_text(encoding="utf-8"))
    scenario.pop("name", None)
    policy = Path(settings.policy)
    text = policy.read_text(encoding="utf-8") if not settings.verify else str(policy)
    blob = json.dumps([scenario, text, settings.seed, settings.verify], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _done(
    timings: dict[str, tuple[float, float]],
    on_run: Callable[[RunPlan, float, str | None], None] | None,
    plan: RunPlan,
    evaluator: RunEvaluator | None,
    seconds: float,
    error: str | None,
) -> None:
    timings[plan.settings.run_id] = (seconds, evaluator.seconds if evaluator else 0.0)
    if error is not None:
        (plan.settings.out_dir / "error.txt").write_text(error)
    if on_run is not None:
        on_run(plan, seconds, error)


def _json_default(value: object) -> object:
    return str(value)


def _run_file(folder: Path) -> dict[str, Any]:
    path = folder / GYM_FILE
    if not path.exists():
        return {}
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _mismatches(folder: Path) -> list[str]:
    """Layers the arm's scenario feeds that its policy does not define (never trained)."""
    scenario_file = folder / "scenario.yaml"
    if not scenario_file.exists():
        return []
    policy_file = folder / "policy.yaml"
    run = json.loads((folder / GYM_FILE).read_text()) if (folder / GYM_FILE).exists() else {}
    policy_path = policy_file if policy_file.exists() else POLICIES.get(str(run.get("policy")))
    if policy_path is None:
        return []
    from layerfed.governance.loader import load_policy

    scenario = Scenario.model_validate(yaml.safe_load(scenario_file.read_text()))
    policy = load_policy(policy_path)
    unknown = fed_layers(scenario) - {layer.name for layer in policy.layers}
    return [n for n in layer_mismatches(policy, scenario) if any(f"{u!r}" in n for u in unknown)]


def summarise(spec: ExperimentSpec, out: Path, seeds: int) -> dict[str, Any]:
    """Per arm: each metric's per-seed values, mean and 95% CI; per-round series per seed.

    Also per arm the policy and base model it ran and the base's starting scores, and
    per experiment the verdicts (:mod:`layerfed.simulation.verdicts`).
    """
    arms: dict[str, Any] = {}
    for arm in spec.arms:
        files = [_run_file(out / spec.name / arm.name / f"seed-{s}") for s in range(seeds)]
        files = [f for f in files if f.get("rounds")]
        runs = [f["rounds"] for f in files]
        values = {name: [SUMMARIES[name](r, spec) for r in runs] for name in spec.metrics}
        bounds = {
            name: [CENSOR_BOUNDS[name](r) for r in runs]
            for name in spec.metrics
            if name in CENSOR_BOUNDS
        }
        first = files[0] if files else {}
        folder = out / spec.name / arm.name / "seed-0"
        arms[arm.name] = {
            "notes": _mismatches(folder) + base_notes(spec, arm, first.get("base_model")),
            "label": arm.label,
            "runs": len(runs),
            "policy": first.get("policy", arm.policy),
            "base_model": first.get("base_model", arm.base or spec.base),
            "base_scores": first.get("base", {}),
            "values": values,
            "bounds": bounds,
            "stats": {k: m.mean_ci(v) for k, v in values.items()},
            "series": {
                key: [[number(row, key) for row in r] for r in runs]
                for key in {*spec.plots, *m.SERIES}
            },
            "rounds": [[int(row["round"]) for row in r] for r in runs],
            "mechanisms": mechanism_totals(runs),
        }
    verdicts = [judge(v, arms) for v in spec.verdicts]
    return {"name": spec.name, "title": spec.title, "arms": arms, "verdicts": verdicts}
