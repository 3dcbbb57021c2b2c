"""The gym's run settings: a :class:`RunSettings` plus the scenario that fills it in.

Only simulation reads a scenario: it supplies rounds, seed, run id, per-layer
sampling and the roster of simulated instances. Deployments never see this type.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from layerfed.federation.run_config import RunConfigError, RunSettings
from layerfed.governance.canonical import policy_hash
from layerfed.governance.loader import load_policy
from layerfed.governance.schema import Policy
from layerfed.layers.device import DeviceSettingError, check_device, check_dtype, device_is_cuda
from layerfed.simulation.keys import sim_policy
from layerfed.simulation.scenario import Scenario, load_scenario

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_ROOT_KEY",
    "DEFAULT_SCENARIO",
    "PACKAGE_ROOT",
    "SimSettings",
]

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POLICY = PACKAGE_ROOT / "examples" / "policies" / "default.yaml"
DEFAULT_SCENARIO = PACKAGE_ROOT / "examples" / "scenarios" / "demo.yaml"
DEFAULT_ROOT_KEY = PACKAGE_ROOT / "examples" / "keys" / "creator-demo.pub"
"""The demo root key: its private half ships in examples/keys/, so only the gym trusts it."""


@dataclass(frozen=True)
class SimSettings(RunSettings):
    """Run settings of a simulated federation: the scenario fills what is left unset.

    ``rounds`` 0 and ``seed`` -1 mean the scenario's; an empty ``run_id`` becomes
    ``<scenario>-<seed>-<nonce>`` (unique per run, kept on resume).

    ``device``/``dtype`` place the server's base; ``instance_device``/``instance_dtype``
    the simulated instances' (empty: the server's). ``num_gpus`` is Flower's
    ``client_resources`` share of a GPU per virtual client; -1 (auto) gives each of
    ``LAYERFED_CPUS`` clients an equal share when the instances run on CUDA, else 0.
    """

    policy: str = str(DEFAULT_POLICY)
    scenario: str = str(DEFAULT_SCENARIO)
    out: str = "runs/demo"
    rounds: int = 0
    seed: int = -1
    root_key: str = str(DEFAULT_ROOT_KEY)
    instance_device: str = ""
    instance_dtype: str = ""
    num_gpus: float = -1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            if self.instance_device:
                check_device(self.instance_device, setting="layerfed-instance-device")
            if self.instance_dtype:
                check_dtype(self.instance_dtype, setting="layerfed-instance-dtype")
        except DeviceSettingError as e:
            raise RunConfigError(
                f"run config {e.setting}: expected {e.expected}, got {e.got!r}"
            ) from e

    def instance_placement(self) -> tuple[str, str]:
        """``(device, dtype)`` of the simulated instances' base."""
        return self.instance_device or self.device, self.instance_dtype or self.dtype

    def gpus_per_client(self, cpus: int) -> float:
        """Flower's ``num_gpus`` per virtual client (see ``num_gpus``); 0 on a CPU-only machine."""
        if self.num_gpus >= 0:
            return self.num_gpus
        device = self.instance_placement()[0]
        if device == "cpu" or not device_is_cuda(device):
            return 0.0
        return 1.0 / max(1, cpus)

    def resolved(self) -> SimSettings:
        """Settings with rounds, seed, sampling and run id filled in from the scenario."""
        scenario = self.load_scenario()  # first: a bad scenario fails before torch loads
        from layerfed.federation.server_state import checkpoint_run_id

        seed = self.seed if self.seed >= 0 else scenario.seed
        sample = self.sample or ",".join(f"{k}={v}" for k, v in scenario.sample_per_layer.items())
        return dataclasses.replace(
            self,
            rounds=self.rounds if self.rounds > 0 else scenario.rounds,
            seed=seed,
            sample=sample,
            run_id=self.run_id
            or checkpoint_run_id(self.out_dir)
            or f"{scenario.name}-{seed}-{secrets.token_hex(4)}",
        )

    def load_scenario(self) -> Scenario:
        """The scenario (cached per process)."""
        return _scenario(self.scenario)

    def load_policy(self) -> Policy:
        """The policy plus the simulated principals the gym's instances are certified by."""
        return self.loaded_policy()[0]

    def loaded_policy(self) -> tuple[Policy, str]:
        """:meth:`load_policy` and the canonical hash of the file's policy, the one the
        server verifies and stamps on every task (``Task.policy_hash``).

        Cached per process by path and content digest: a changed file is read again.
        """
        policy, verified_hash = _policy(self.policy, _file_digest(self.policy))
        return sim_policy(policy, self.seed), verified_hash


@lru_cache(maxsize=4)
def _scenario(path: str) -> Scenario:
    return load_scenario(path)


def _file_digest(path: str) -> str:
    """SHA-256 of the file's bytes ("" when unreadable: the loader then names the error)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


@lru_cache(maxsize=4)
def _policy(path: str, content: str) -> tuple[Policy, str]:
    """The policy at ``path`` whose bytes hash to ``content`` (the cache key), and its
    canonical hash (of the parsed policy, so exact even if the file changes meanwhile)."""
    policy = load_policy(path)
    return policy, policy_hash(policy)
