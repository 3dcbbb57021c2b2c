"""What one federated run needs to know on the server: Flower's run config, typed.

Deployment reads these from ``[tool.flwr.app.config]`` / ``flwr run --run-config``;
a research host builds them in code (and may subclass them with its own fields).
Nothing here reads a scenario or derives a key; what a host relaxes or adds reaches
the server as objects (:class:`~layerfed.federation.host.Host`), never as a setting.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from layerfed.errors import LayerfedError
from layerfed.layers.device import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DeviceSettingError,
    check_device,
    check_dtype,
)

__all__ = ["RETIRED_KEYS", "RunConfigError", "RunSettings", "parse_sampling"]

RETIRED_KEYS = {
    "layerfed-simulation": "removed: a deployed ServerApp never relaxes trust; simulated keys "
    "and the demo root exist only in `layerfed simulate`, which injects them itself",
}
"""Run config keys that no longer exist, and why (an old config naming one is refused)."""


class RunConfigError(LayerfedError):
    """A run config value is missing or malformed (names the key, expected and got)."""


@dataclass(frozen=True)
class RunSettings:
    """Paths and numbers of one run; flat so they fit a Flower run config.

    ``sample`` is ``"layer=n,layer=n"``: instances sampled per layer and round (a
    layer not named trains on every instance that feeds it). ``run_id`` empty means
    a fresh random id per run (recorded in the checkpoint, kept on ``resume``).
    ``server_key`` is the Ed25519 private key (PEM, ``layerfed keys new``) that signs
    checkpoints; a deployment must name one (a research host may inject another source).
    ``keep_candidates`` N > 0 keeps each slot's judged mean of the last N rounds under
    ``<out>/candidates/`` for ``layerfed audit replay`` (0, the default: none kept).
    ``device`` and ``dtype`` place the server's base (probes, red-line gate): deployment
    settings (:mod:`layerfed.layers.device`), float32 on the CPU by default; committed
    slots are float32 whatever they are.
    """

    policy: str = ""
    out: str = "runs/deploy"
    rounds: int = 1
    seed: int = 0
    run_id: str = ""
    sample: str = ""
    resume: bool = False
    root_key: str = ""
    trusted: str = ""
    server_key: str = ""
    verify: bool = True
    timeout: float = 600.0
    keep_candidates: int = 0
    device: str = DEFAULT_DEVICE
    dtype: str = DEFAULT_DTYPE

    def __post_init__(self) -> None:
        try:
            check_device(self.device, setting="layerfed-device")
            check_dtype(self.dtype, setting="layerfed-dtype")
        except DeviceSettingError as e:
            raise RunConfigError(
                f"run config {e.setting}: expected {e.expected}, got {e.got!r}"
            ) from e

    def to_config(self) -> dict[str, Any]:
        """Flat ``str -> scalar`` items for a Flower ConfigRecord / run config."""
        return {f"layerfed-{k.replace('_', '-')}": v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Read settings from a run config (keys ``layerfed-*``; unknown keys are ignored).

        A retired key (:data:`RETIRED_KEYS`) is refused with what replaced it.
        """
        for key, why in RETIRED_KEYS.items():
            if key in config:
                raise RunConfigError(
                    f"run config {key}: expected no such key ({why}), got {config[key]!r}"
                )
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f"layerfed-{f.name.replace('_', '-')}"
            if key not in config:
                continue
            kind = type(getattr(cls(), f.name))
            try:
                values[f.name] = kind(config[key])
            except (TypeError, ValueError) as e:
                raise RunConfigError(
                    f"run config {key}: expected {kind.__name__}, got {config[key]!r}"
                ) from e
        return cls(**values)

    def resolved(self) -> RunSettings:
        """These settings with a run id: given, else the checkpoint's in ``out``, else random."""
        if self.run_id:
            return self
        from layerfed.federation.server_state import checkpoint_run_id  # torch: not for errors

        kept = checkpoint_run_id(self.out_dir)
        return dataclasses.replace(self, run_id=kept or f"run-{secrets.token_hex(8)}")

    def sampling(self) -> dict[str, int]:
        """``sample`` parsed: instances per layer and round."""
        return parse_sampling(self.sample)

    @property
    def out_dir(self) -> Path:
        """The output folder."""
        return Path(self.out)


def parse_sampling(text: str) -> dict[str, int]:
    """``"creator=2,government=4"`` -> ``{"creator": 2, "government": 4}``."""
    out: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit():
            raise RunConfigError(
                f"run config layerfed-sample: expected 'layer=n' items, got {part!r}"
            )
        out[name.strip()] = int(value)
    return out
