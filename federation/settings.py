"""What one federated run needs to know, on the server and on every client.

The same settings reach both sides in simulation (captured by the apps) and in
deployment (Flower's run config, ``[tool.flwr.app.config]`` or ``--run-config``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from layerfed.governance.keys import public_key_string
from layerfed.governance.loader import load_policy
from layerfed.governance.schema import Policy, Principal
from layerfed.simulation.scenario import Scenario, load_scenario

__all__ = ["RunSettings", "layer_principal", "sim_instance_key", "sim_layer_key", "sim_policy"]

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POLICY = PACKAGE_ROOT / "examples" / "policies" / "default.yaml"
DEFAULT_SCENARIO = PACKAGE_ROOT / "examples" / "scenarios" / "demo.yaml"
DEFAULT_ROOT_KEY = PACKAGE_ROOT / "examples" / "keys" / "creator-demo.pub"
_DEFAULT_WHEN_EMPTY = frozenset({"policy", "scenario", "root_key"})


@dataclass(frozen=True)
class RunSettings:
    """Paths and numbers of one run; flat so they fit a Flower run config."""

    policy: str = str(DEFAULT_POLICY)
    scenario: str = str(DEFAULT_SCENARIO)
    out: str = "runs/demo"
    rounds: int = 0
    seed: int = -1
    run_id: str = ""
    resume: bool = False
    simulated_keys: bool = True
    root_key: str = str(DEFAULT_ROOT_KEY)
    trusted: str = ""
    verify: bool = True
    simulation: bool = False
    timeout: float = 600.0

    def to_config(self) -> dict[str, Any]:
        """Flat ``str -> scalar`` items for a Flower ConfigRecord / run config."""
        return {f"layerfed-{k.replace('_', '-')}": v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Read settings back from a run config (unknown keys are ignored).

        An empty ``policy``, ``scenario`` or ``root_key`` means the built-in default
        (a Flower run config must declare every key, so pyproject.toml lists them empty).
        """
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f"layerfed-{f.name.replace('_', '-')}"
            if f.name in _DEFAULT_WHEN_EMPTY and config.get(key) == "":
                continue
            if key in config:
                kind = type(getattr(cls(), f.name))
                values[f.name] = kind(config[key])
        return cls(**values)

    def resolved(self) -> RunSettings:
        """Settings with rounds, seed and run id filled in from the scenario."""
        scenario = self.load_scenario()
        rounds = self.rounds if self.rounds > 0 else scenario.rounds
        seed = self.seed if self.seed >= 0 else scenario.seed
        run_id = self.run_id or f"{scenario.name}-{seed}"
        return RunSettings(**{**asdict(self), "rounds": rounds, "seed": seed, "run_id": run_id})

    def load_scenario(self) -> Scenario:
        """The scenario (cached per process)."""
        return _scenario(self.scenario)

    def load_policy(self) -> Policy:
        """The policy as the federation uses it (with simulated principals when asked)."""
        policy = _policy(self.policy)
        return sim_policy(policy, self.seed) if self.simulated_keys else policy

    @property
    def out_dir(self) -> Path:
        """The output folder."""
        return Path(self.out)


@lru_cache(maxsize=4)
def _scenario(path: str) -> Scenario:
    return load_scenario(path)


@lru_cache(maxsize=4)
def _policy(path: str) -> Policy:
    return load_policy(path)


def _key(*parts: object) -> Ed25519PrivateKey:
    seed = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(seed)


def sim_layer_key(seed: int, layer: str) -> Ed25519PrivateKey:
    """The simulated key of a layer's delegating principal (deterministic from the seed)."""
    return _key("layerfed-sim-layer", seed, layer)


def sim_instance_key(seed: int, instance_id: str) -> Ed25519PrivateKey:
    """The simulated key of one instance (deterministic from the seed)."""
    return _key("layerfed-sim-instance", seed, instance_id)


def layer_principal(layer: str) -> str:
    """Name of the simulated principal that certifies a layer's instance keys."""
    return f"sim_{layer}"


def sim_policy(policy: Policy, seed: int) -> Policy:
    """``policy`` plus one delegating principal per layer whose key the simulation holds.

    Simulated instances sign with their own keys, certified by these principals,
    exactly as deployed instances do with keys certified by a real layer key.
    """
    have = {p.name for p in policy.principals}
    extra = [
        Principal(
            name=layer_principal(layer.name),
            layer=layer.name,
            public_key=public_key_string(sim_layer_key(seed, layer.name).public_key()),
            delegates_to_instances=True,
        )
        for layer in policy.layers
        if layer_principal(layer.name) not in have
    ]
    return policy.model_copy(update={"principals": [*policy.principals, *extra]})
