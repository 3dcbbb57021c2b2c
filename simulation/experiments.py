"""The essay's experiments: named scenarios with arms, run over seeds, summarised per arm.

An experiment file (``examples/scenarios/experiments/NAME.yaml``) holds a scenario
and its arms. An arm names a policy (``default``, ``ungoverned`` or a path), optional
patches to the policy and the scenario (dicts merged in; list items matched by
``id``, ``id_prefix`` or ``name``) and ``shared_layer`` (every instance feeds that
one layer: the ungoverned baseline). :func:`plan_experiment` writes each run's
scenario and policy under ``OUT/NAME/ARM/seed-K/``; :func:`run_experiments` runs
all of one experiment's runs inside one Flower simulation and :func:`summarise`
reduces each run's per-round series (``gym.json``) to the experiment's metrics.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layerfed.errors import LayerfedError
from layerfed.simulation import metrics as m
from layerfed.simulation.evaluate import GYM_FILE, RunEvaluator
from layerfed.simulation.runner import RunPlan, run_plans
from layerfed.simulation.scenario import Scenario
from layerfed.simulation.settings import DEFAULT_ROOT_KEY, PACKAGE_ROOT, SimSettings

__all__ = [
    "EXPERIMENTS_DIR",
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
]

log = logging.getLogger("layerfed")
EXPERIMENTS_DIR = PACKAGE_ROOT / "examples" / "scenarios" / "experiments"
POLICIES = {
    "default": PACKAGE_ROOT / "examples" / "policies" / "default.yaml",
    "ungoverned": PACKAGE_ROOT / "examples" / "policies" / "ungoverned.yaml",
}
_KEYS = ("id", "id_prefix", "name")


class ExperimentError(LayerfedError):
    """An experiment file that cannot be read or breaks a rule; names file and field."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ArmSpec(_Frozen):
    """One arm: a policy and the changes that set it apart."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    label: str = ""
    policy: str = "default"
    policy_patch: dict[str, Any] = Field(default_factory=dict)
    scenario_patch: dict[str, Any] = Field(default_factory=dict)
    shared_layer: str | None = None


class ExperimentSpec(_Frozen):
    """A named experiment: question, scenario, arms, and what to report."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    title: str
    essay: str = Field(description="The essay idea it tests.")
    question: str
    scenario: dict[str, Any]
    arms: list[ArmSpec] = Field(min_length=1)
    metrics: list[str] = Field(min_length=1)
    plots: list[str] = Field(default_factory=lambda: ["violation"])
    reinforce_until: int | None = Field(default=None, ge=1)
    criterion: float = Field(default=0.1, ge=0, le=1)


def deep_merge(base: Any, patch: Any) -> Any:
    """``patch`` merged into ``base`` (neither changed); dicts recurse, list items by key.

    A dict patch on a list of dicts merges each entry into the item whose ``id``,
    ``id_prefix`` or ``name`` equals the entry's key; anything else replaces.
    """
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = deep_merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(patch, dict):
        items = list(base)
        for key, value in patch.items():
            hits = [i for i, it in enumerate(items) if _item_key(it) == key]
            if not hits:
                raise KeyError(f"no list item with id, id_prefix or name {key!r}")
            items[hits[0]] = deep_merge(items[hits[0]], value)
        return items
    return patch


def _item_key(item: Any) -> Any:
    if isinstance(item, dict):
        return next((item[k] for k in _KEYS if k in item), None)
    return None


def load_experiment(path: str | Path) -> ExperimentSpec:
    """Read an experiment file; raise :class:`ExperimentError` naming file and field."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        spec = ExperimentSpec.model_validate(data)
    except (OSError, yaml.YAMLError) as e:
        raise ExperimentError(f"{path}: expected a readable YAML experiment, got {e}") from e
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ExperimentError(f"{path}: {field}: {first['msg']}, got {first.get('input')!r}") from e
    unknown = [x for x in spec.metrics if x not in SUMMARIES]
    if unknown:
        raise ExperimentError(
            f"{path}: metrics: expected names from {sorted(SUMMARIES)}, got {unknown}"
        )
    for arm in spec.arms:  # fail early: every arm's scenario must validate
        _arm_scenario(spec, arm, 0, where=str(path))
    return spec


def list_experiments(folder: Path = EXPERIMENTS_DIR) -> list[ExperimentSpec]:
    """Every experiment in ``folder``, by name."""
    return sorted((load_experiment(p) for p in folder.glob("*.yaml")), key=lambda s: s.name)


def _arm_scenario(spec: ExperimentSpec, arm: ArmSpec, seed: int, where: str = "") -> Scenario:
    data = deep_merge({"name": spec.name, **spec.scenario}, arm.scenario_patch)
    data = {**data, "name": f"{spec.name}-{arm.name}", "seed": seed}
    if arm.shared_layer:
        data = _share(data, arm.shared_layer)
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ExperimentError(f"{where}: arms.{arm.name}: scenario.{field}: {first['msg']}") from e


def _share(data: dict[str, Any], layer: str) -> dict[str, Any]:
    """Every instance and population feeds ``layer`` only; per-layer sampling dropped."""
    out = dict(data)
    for key in ("instances", "populations"):
        out[key] = [{**item, "layers": [layer]} for item in data.get(key, [])]
    out["sample_per_layer"] = {}
    return out


def _arm_policy(arm: ArmSpec) -> tuple[Path, bool]:
    path = POLICIES.get(arm.policy, PACKAGE_ROOT / arm.policy)
    return path, not arm.policy_patch


def plan_experiment(spec: ExperimentSpec, seeds: int, out: Path) -> list[RunPlan]:
    """Write each run's scenario (and patched policy) and return the plans, arm-major."""
    plans = []
    for arm in spec.arms:
        base_policy, signed = _arm_policy(arm)
        for seed in range(seeds):
            folder = out / spec.name / arm.name / f"seed-{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            scenario = _arm_scenario(spec, arm, seed)
            scenario_file = folder / "scenario.yaml"
            scenario_file.write_text(yaml.safe_dump(scenario.model_dump(mode="json")))
            policy_file = base_policy
            if not signed:
                data = yaml.safe_load(base_policy.read_text(encoding="utf-8"))
                policy_file = folder / "policy.yaml"
                policy_file.write_text(yaml.safe_dump(deep_merge(data, arm.policy_patch)))
            settings = SimSettings(
                policy=str(policy_file),
                scenario=str(scenario_file),
                out=str(folder),
                seed=seed,
                run_id=f"{spec.name}-{arm.name}-s{seed}",
                root_key=str(DEFAULT_ROOT_KEY),
                verify=signed,
                simulation=True,
            ).resolved()
            plans.append(RunPlan(spec.name, arm.name, seed, settings))
    return plans


def run_experiments(
    specs: Sequence[ExperimentSpec],
    seeds: int,
    out: Path,
    on_run: Callable[[RunPlan, float, str | None], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every experiment's runs inside one Flower simulation; return and write summaries."""
    plans = [plan for spec in specs for plan in plan_experiment(spec, seeds, out)]
    timings: dict[str, float] = {}
    run_plans(plans, partial(_done, timings, on_run))
    results: dict[str, dict[str, Any]] = {}
    for spec in specs:
        results[spec.name] = summarise(spec, out, seeds)
        prefix = f"{spec.name}-"
        results[spec.name]["seconds"] = sum(
            t for run_id, t in timings.items() if run_id.startswith(prefix)
        )
        path = out / spec.name / "summary.json"
        path.write_text(json.dumps(results[spec.name], indent=1, default=_json_default))
    return results


def _done(
    timings: dict[str, float],
    on_run: Callable[[RunPlan, float, str | None], None] | None,
    plan: RunPlan,
    evaluator: RunEvaluator | None,
    seconds: float,
    error: str | None,
) -> None:
    timings[plan.settings.run_id] = seconds
    if error is not None:
        (plan.settings.out_dir / "error.txt").write_text(error)
    if on_run is not None:
        on_run(plan, seconds, error)


def _json_default(value: object) -> object:
    return str(value)


def _series(folder: Path) -> list[dict[str, Any]]:
    path = folder / GYM_FILE
    if not path.exists():
        return []
    rounds: list[dict[str, Any]] = json.loads(path.read_text())["rounds"]
    return rounds


def summarise(spec: ExperimentSpec, out: Path, seeds: int) -> dict[str, Any]:
    """Per arm: each metric's per-seed values, mean and 95% CI; per-round series per seed."""
    arms: dict[str, Any] = {}
    for arm in spec.arms:
        runs = [_series(out / spec.name / arm.name / f"seed-{s}") for s in range(seeds)]
        runs = [r for r in runs if r]
        values = {name: [SUMMARIES[name](r, spec) for r in runs] for name in spec.metrics}
        arms[arm.name] = {
            "label": arm.label,
            "runs": len(runs),
            "values": values,
            "stats": {k: m.mean_ci(v) for k, v in values.items()},
            "series": {
                key: [[_num(row, key) for row in r] for r in runs]
                for key in {*spec.plots, "violation"}
            },
        }
    return {"name": spec.name, "title": spec.title, "arms": arms}


def _num(row: Mapping[str, Any], key: str) -> float:
    value = row.get(key, math.nan)
    if isinstance(value, dict):
        return float(sum(value.values()) / len(value)) if value else math.nan
    return float(value)


def _at(series: list[dict[str, Any]], key: str, round_: int | None) -> float:
    if round_ is None:
        return _num(series[-1], key)
    rows = [r for r in series if r["round"] == round_]
    return _num(rows[0], key) if rows else math.nan


Summary = Callable[[list[dict[str, Any]], ExperimentSpec], float]


def _final(key: str) -> Summary:
    return lambda s, spec: _at(s, key, None)


def _retention(key: str, invert: bool) -> Summary:
    def f(s: list[dict[str, Any]], spec: ExperimentSpec) -> float:
        then, now = _at(s, key, spec.reinforce_until), _at(s, key, None)
        return m.retention(1 - then, 1 - now) if invert else m.retention(then, now)

    return f


SUMMARIES: dict[str, Summary] = {
    "violation": _final("violation"),
    "false_refusal": _final("false_refusal"),
    "capability": _final("capability"),
    "pref_individual": _final("pref_individual"),
    "pref_group": _final("pref_group"),
    "leakage": _final("leakage"),
    "violation_peak": lambda s, spec: max(_num(r, "violation") for r in s),
    "violation_at_reinforce_end": lambda s, spec: _at(s, "violation", spec.reinforce_until),
    "pref_individual_r5": lambda s, spec: _at(s, "pref_individual", min(5, len(s))),
    "pref_at_reinforce_end": lambda s, spec: _at(s, "pref_individual", spec.reinforce_until),
    "retention": _retention("violation", invert=True),
    "pref_retention": _retention("pref_individual", invert=False),
    "n50": lambda s, spec: m.n50([r["attacks"] for r in s], [r["violation"] for r in s]),
    "events_to_criterion": lambda s, spec: m.events_to_criterion(
        [r["events"] for r in s], [r["violation"] for r in s], spec.criterion
    ),
    "vetoes": lambda s, spec: float(sum(r.get("vetoes", 0) for r in s)),
}
"""Summary metrics an experiment may list, each a function of one run's series."""
