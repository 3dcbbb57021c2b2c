"""The gym: the tiny world and base model, simulated people, scenarios, experiments, reports.

It sits on top of the framework and plugs in from above (entry points,
:class:`~layerfed.simulation.client.GymSource`, ``run_server(host=gym_host(...))``);
nothing below imports it. Names are imported on first use, so reading experiment
files (``layerfed experiment list``) needs neither torch nor Flower.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from layerfed.simulation.client import GymSource, gym_client_app
    from layerfed.simulation.scenario import Scenario, ScenarioError, load_scenario
    from layerfed.simulation.server import gym_server_app, run_gym_server
    from layerfed.simulation.settings import SimSettings
    from layerfed.simulation.simulate import SimulationError, simulate

__all__ = [
    "GymSource",
    "Scenario",
    "ScenarioError",
    "SimSettings",
    "SimulationError",
    "gym_client_app",
    "gym_server_app",
    "load_scenario",
    "run_gym_server",
    "simulate",
]

_HOME = {
    "GymSource": "client",
    "gym_client_app": "client",
    "Scenario": "scenario",
    "ScenarioError": "scenario",
    "load_scenario": "scenario",
    "gym_server_app": "server",
    "run_gym_server": "server",
    "SimSettings": "settings",
    "SimulationError": "simulate",
    "simulate": "simulate",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    if name not in _HOME:
        raise AttributeError(f"module 'layerfed.simulation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"layerfed.simulation.{_HOME[name]}"), name)
