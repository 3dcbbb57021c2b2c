"""The gym: the tiny world and base model, simulated people, scenarios, experiments, reports.

It sits on top of the framework and plugs in from above (entry points,
:class:`~layerfed.simulation.client.GymSource`, ``run_server(roster=...)``);
nothing below imports it.
"""

from __future__ import annotations

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
