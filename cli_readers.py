"""Readers the CLI hands to governance commands (which import neither torch nor the gym).

``policy check`` / ``policy diff`` find a :class:`~layerfed.governance.model_params.ModelReader`
in the Typer context: it reads a model's parameter names (:mod:`layerfed.layers.param_names`)
and a scenario's population per layer (:func:`scenario_reach`, for the reachability checks).
Everything heavy is imported when a reader is called, not when the CLI starts.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from layerfed.governance.model_params import ModelParams, ModelReader
from layerfed.governance.reachability import LayerReach

if TYPE_CHECKING:
    from layerfed.governance.schema import Policy

__all__ = ["cli_readers", "read_names", "red_line_rates", "scenario_reach"]


def read_names(model: str, root: Path | None = None) -> ModelParams:
    """Parameter names, shapes and ties of a model, without loading its weights."""
    from layerfed.layers.param_names import read_param_names

    return read_param_names(model, root=root)


def scenario_reach(path: str, policy: Policy) -> dict[str, LayerReach]:
    """Per layer of ``policy``: eligible instances, sample size and largest slot in a scenario.

    Populations cycle through their jurisdictions and groups, so the counts are
    arithmetic: a million instances cost no more than ten.
    """
    from layerfed.simulation.scenario import load_scenario

    scenario = load_scenario(Path(path))
    out: dict[str, LayerReach] = {}
    for layer in policy.layers:
        eligible = 0
        keys: Counter[str] = Counter()
        for spec in scenario.instances:
            if layer.name in spec.layers:
                eligible += 1
                keys.update(
                    [spec.jurisdiction] if layer.slot_key == "jurisdiction" else spec.groups
                )
        for pop in scenario.populations:
            if layer.name not in pop.layers:
                continue
            eligible += pop.count
            cycle = pop.jurisdictions if layer.slot_key == "jurisdiction" else pop.groups
            for k, value in enumerate(cycle):
                members = len(range(k, pop.count, len(cycle)))
                names = [value] if isinstance(value, str) else value
                keys.update({name: members for name in names})
        largest = {"global": eligible, "instance": min(1, eligible)}.get(
            layer.slot_key, max(keys.values(), default=0)
        )
        sample = scenario.sample_per_layer.get(layer.name)
        out[layer.name] = LayerReach(eligible, sample, largest)
    return out


def red_line_rates(policy: Policy, model: str) -> dict[str, float]:
    """Each red-line suite's violation rate on ``model`` (its weights loaded)."""
    from layerfed.layers.redline_rates import model_red_line_rates

    return model_red_line_rates(policy, model)


def cli_readers() -> ModelReader:
    """The readers ``layerfed`` puts in the Typer context for governance commands."""
    return ModelReader(read_names, scenario=scenario_reach, red_lines=red_line_rates)
