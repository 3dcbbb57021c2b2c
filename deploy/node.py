"""One SuperNode of a local deployment: the node config it is started with.

:class:`NodeSpec` writes the ``--node-config`` keys of
:class:`~layerfed.wire.node_config.NodeConfig`, the schema the ClientApp reads them with.
"""

from __future__ import annotations

import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerfed.errors import LayerfedError
from layerfed.wire.node_config import NodeConfig

__all__ = ["DeployError", "NodeSpec", "free_port", "run_config_string"]

_KEY = re.compile(r"[A-Za-z0-9_-]+")
_UNQUOTABLE = re.compile(r"[\"\\\x00-\x1f\x7f]")


class DeployError(LayerfedError):
    """A local deployment step failed; names the step, what was expected and what was got."""

    def __init__(self, where: str, expected: str, got: str) -> None:
        self.where, self.expected, self.got = where, expected, got
        super().__init__(f"{where}: expected {expected}, got {got}")


@dataclass(frozen=True)
class NodeSpec:
    """One SuperNode and the instance it serves (its ``--node-config``); no scenario anywhere.

    Either ``instance_config`` names an instance TOML (docs/deployment.md), or the same
    fields are given flat: identity, ``policy`` with ``root_key`` (or ``trusted``),
    ``model`` (``builtin:NAME`` or a Hugging Face folder; default the policy's),
    ``key_file`` + ``certificate_dir``, ``journal``, ``state_dir`` and the ``[sync]``
    settings ``server_key`` + ``sync_keep``. Paths are passed
    as absolute paths (the ClientApp runs in another working directory). ``auth_key``
    is the SuperNode's own authentication key, not part of the node config.
    """

    instance_id: str
    instance_config: Path | None = None
    policy: Path | None = None
    root_key: Path | None = None
    trusted: Path | None = None
    model: str | None = None
    jurisdiction: str = "none"
    groups: tuple[str, ...] = ()
    layers: tuple[str, ...] = ("individual",)
    key_file: Path | None = None
    certificate_dir: Path | None = None
    journal: Path | None = None
    state_dir: Path | None = None
    server_key: Path | None = None
    sync_keep: int | None = None
    auth_key: Path | None = None

    @classmethod
    def from_instance_config(cls, path: Path, auth_key: Path | None = None) -> NodeSpec:
        """A node serving the instance an instance TOML describes (its ``[instance] id``)."""
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
            instance_id = data["instance"]["id"]
        except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as e:
            raise DeployError(str(path), "an instance TOML with [instance] id", repr(e)) from e
        if not isinstance(instance_id, str):
            raise DeployError(f"{path}: instance.id", "a string", repr(instance_id))
        return cls(instance_id, instance_config=path, auth_key=auth_key)

    def node_config(self) -> str:
        """The ``--node-config`` value the ClientApp builds its instance from
        (:class:`~layerfed.wire.node_config.NodeConfig`, the schema the ClientApp reads)."""
        return run_config_string(self.config().items())

    def config(self) -> NodeConfig:
        """This node's :class:`~layerfed.wire.node_config.NodeConfig`, paths made absolute."""
        if self.instance_config is not None:
            return NodeConfig(instance_config=str(self.instance_config.resolve()))
        if self.policy is None:
            raise DeployError(
                f"node {self.instance_id}", "an instance_config or a policy", "neither"
            )

        def path(value: Path | None) -> str | None:
            return None if value is None else str(value.resolve())

        model = self.model
        if model is not None and not model.startswith("builtin:"):
            model = str(Path(model).resolve())
        return NodeConfig(
            instance_id=self.instance_id,
            jurisdiction=self.jurisdiction,
            groups=self.groups,
            layers=self.layers,
            policy=str(self.policy.resolve()),
            root_key=path(self.root_key),
            trusted=path(self.trusted),
            key_file=path(self.key_file),
            certificate_dir=path(self.certificate_dir),
            journal=path(self.journal),
            state_dir=path(self.state_dir),
            server_key=path(self.server_key),
            sync_keep=self.sync_keep,
            model=model,
        )


def run_config_string(values: Mapping[str, Any]) -> str:
    """``key=value`` pairs in the TOML syntax ``--run-config`` and ``--node-config`` parse."""

    def _value(key: str, v: Any) -> str:
        if not _KEY.fullmatch(key):
            raise DeployError("config key", "letters, digits, '-' or '_'", repr(key))
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if not isinstance(v, str) or _UNQUOTABLE.search(v):
            raise DeployError(
                key,
                "a number, a bool or a string without '\"', '\\' or control characters",
                repr(v),
            )
        return f'"{v}"'

    return " ".join(f"{k}={_value(k, v)}" for k, v in values.items())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
