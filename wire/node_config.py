"""The node-config keys a SuperNode's ClientApp reads: one schema for writer and reader.

A deployed SuperNode is started with ``--node-config "KEY=VALUE ..."``. Either
``instance-config`` names an instance TOML, or the instance is given by flat keys
(:data:`NODE_CONFIG_KEYS`). :class:`NodeConfig` holds them typed; the local harness
(``layerfed.deploy``) writes them with :meth:`NodeConfig.items` and the client SDK
reads them with :meth:`NodeConfig.parse`, which raises :class:`NodeConfigError`
naming the key, the expected and the got. Keys not in the schema (Flower's own) are
ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from layerfed.errors import LayerfedError
from layerfed.layers.device import DeviceSettingError, check_device, check_dtype

__all__ = ["NODE_CONFIG_KEYS", "NodeConfig", "NodeConfigError"]


class NodeConfigError(LayerfedError):
    """A node-config value has the wrong type: names the key, the expected and the got."""

    def __init__(self, key: str, expected: str, got: object) -> None:
        self.key, self.expected, self.got = key, expected, got
        super().__init__(f"node config {key}: expected {expected}, got {got!r}")


@dataclass(frozen=True)
class NodeConfig:
    """The node config of one deployed instance, typed (paths as given: strings)."""

    instance_config: str | None = None
    """An instance TOML; when set, every other key is ignored."""
    instance_id: str = ""
    jurisdiction: str = "none"
    groups: tuple[str, ...] = ()
    layers: tuple[str, ...] = ("individual",)
    policy: str = ""
    root_key: str | None = None
    trusted: str | None = None
    key_file: str | None = None
    certificate_dir: str | None = None
    journal: str | None = None
    state_dir: str | None = None
    model: str | None = None
    """``builtin:NAME`` or a model folder; None: the policy's ``base_model``."""
    device: str | None = None
    """Where the base runs: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; None: cpu."""
    dtype: str | None = None
    """The base's dtype: ``float32``, ``bfloat16`` or ``float16``; None: float32."""
    server_key: str | None = None
    """The run's server public key (``[sync] server_key``): synced slots are saved only
    when it signed them; None: nothing synced is saved."""
    sync_keep: int | None = None
    """Versions of each synced slot kept (``[sync] keep``); None: the default (3)."""

    @classmethod
    def parse(cls, config: Mapping[str, Any]) -> NodeConfig:
        """The schema's keys of a Flower node config, type-checked."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = NODE_CONFIG_KEYS[f.name]
            if key not in config:
                continue
            value = config[key]
            if not isinstance(value, str):
                raise NodeConfigError(key, "a string", value)
            if f.name in _LISTS:
                values[f.name] = tuple(p for p in value.split(",") if p)
            elif f.name in _COUNTS and value:
                values[f.name] = _count(key, value)
            elif f.name in _PLACEMENT and value:
                values[f.name] = _check_placement(f.name, key, value)
            elif value or f.name in _REQUIRED:
                values[f.name] = value
        return cls(**values)

    def items(self) -> dict[str, str]:
        """``key -> value`` strings to write as ``--node-config`` (unset keys left out)."""
        if self.instance_config is not None:
            return {NODE_CONFIG_KEYS["instance_config"]: self.instance_config}
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "instance_config":
                continue
            text = ",".join(value) if f.name in _LISTS else str(value)
            out[NODE_CONFIG_KEYS[f.name]] = text
        return out


NODE_CONFIG_KEYS = {f.name: f.name.replace("_", "-") for f in fields(NodeConfig)}
"""Field name -> node-config key (``instance_id`` -> ``instance-id``)."""
_LISTS = frozenset({"groups", "layers"})
"""Comma-separated lists."""
_REQUIRED = frozenset({"instance_id", "jurisdiction", "policy"})
"""Kept even when empty (the instance config then names the missing field)."""
_COUNTS = frozenset({"sync_keep"})
_DIGITS = re.compile(r"[0-9]{1,9}")
"""Positive integers, written as strings (every node-config value is a string)."""
_PLACEMENT = frozenset({"device", "dtype"})
"""Checked by name here (:mod:`layerfed.layers.device`); nothing is probed."""


def _check_placement(name: str, key: str, value: str) -> str:
    try:
        return check_device(value, setting=key) if name == "device" else check_dtype(value)
    except DeviceSettingError as e:
        raise NodeConfigError(key, e.expected, value) from e


def _count(key: str, value: str) -> int:
    if not _DIGITS.fullmatch(value) or int(value) < 1:
        raise NodeConfigError(key, "a positive integer (as a string)", value)
    return int(value)
