"""Experiment files: the essay's experiments as named scenarios with arms (no torch, no Flower).

An experiment file (``examples/scenarios/experiments/NAME.yaml``) holds a question, the
factor its arms differ in and what they hold equal, a base model, a scenario, its arms,
the metrics to report and the verdicts to judge. An arm names a policy (``default``,
``ungoverned`` or a path), optional patches to the policy and the scenario (dicts merged
in; list items matched by ``id``, ``id_prefix`` or ``name``), a base model, and
``shared_layer`` (every instance feeds that one layer: the ungoverned baseline).
Loading is cheap (YAML and pydantic), so ``layerfed experiment list`` is fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layerfed.errors import LayerfedError
from layerfed.simulation.summaries import SUMMARIES
from layerfed.simulation.verdicts import VerdictSpec

__all__ = [
    "EXPERIMENTS_DIR",
    "PACKAGE_ROOT",
    "POLICIES",
    "ArmSpec",
    "ExperimentError",
    "ExperimentSpec",
    "arm_scenario_data",
    "deep_merge",
    "list_experiments",
    "load_experiment",
]

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
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
    base: str | None = Field(default=None, description="Built-in base; default the experiment's.")


class ExperimentSpec(_Frozen):
    """A named experiment: question, factor, scenario, arms, verdicts and what to report."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    title: str
    essay: str = Field(description="The essay idea it tests.")
    question: str
    factor: str = Field(default="", description="The one thing the arms differ in.")
    held_equal: str = Field(default="", description="What every arm shares.")
    base: str = Field(default="tiny", description="Built-in base model of every arm.")
    scenario: dict[str, Any]
    arms: list[ArmSpec] = Field(min_length=1)
    metrics: list[str] = Field(min_length=1)
    plots: list[str] = Field(default_factory=lambda: ["violation"])
    verdicts: list[VerdictSpec] = Field(default_factory=list)
    in_all: bool = Field(default=True, description="Run by 'layerfed experiment run all'.")
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


def load_experiment(path: str | Path, *, check: bool = True) -> ExperimentSpec:
    """Read an experiment file; raise :class:`ExperimentError` naming file and field.

    ``check`` also validates every arm's scenario (imports the scenario schema).
    """
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
    arms = {a.name for a in spec.arms}
    for i, v in enumerate(spec.verdicts):
        if v.metric not in spec.metrics or not {v.arm, v.baseline} <= arms:
            raise ExperimentError(
                f"{path}: verdicts.{i}: expected a listed metric and two arms of {sorted(arms)}, "
                f"got {v.metric!r}, {v.arm!r}, {v.baseline!r}"
            )
    if check:  # fail early: every arm's scenario must validate
        from layerfed.simulation.scenario import Scenario

        for arm in spec.arms:
            data = arm_scenario_data(spec, arm, 0)
            try:
                Scenario.model_validate(data)
            except ValidationError as e:
                first = e.errors(include_url=False)[0]
                field = ".".join(str(p) for p in first["loc"])
                raise ExperimentError(
                    f"{path}: arms.{arm.name}: scenario.{field}: {first['msg']}"
                ) from e
    return spec


def list_experiments(folder: Path = EXPERIMENTS_DIR, *, check: bool = True) -> list[ExperimentSpec]:
    """Every experiment in ``folder``, by name."""
    specs = (load_experiment(p, check=check) for p in folder.glob("*.yaml"))
    return sorted(specs, key=lambda s: s.name)


def arm_scenario_data(spec: ExperimentSpec, arm: ArmSpec, seed: int) -> dict[str, Any]:
    """The scenario of ``arm`` at ``seed`` as plain data (patched, named, shared if asked)."""
    merged: dict[str, Any] = deep_merge({"name": spec.name, **spec.scenario}, arm.scenario_patch)
    data = {**merged, "name": f"{spec.name}-{arm.name}", "seed": seed}
    if arm.shared_layer:
        data = _share(data, arm.shared_layer)
    return data


def _share(data: dict[str, Any], layer: str) -> dict[str, Any]:
    """Every instance and population feeds ``layer`` only; per-layer sampling dropped."""
    out = dict(data)
    for key in ("instances", "populations"):
        out[key] = [{**item, "layers": [layer]} for item in data.get(key, [])]
    out["sample_per_layer"] = {}
    return out
