"""A local deployment's folder as ``deploy init`` wrote it: ``deploy.toml`` and what it names.

``deploy.toml`` lists the instances (id, layers, instance TOML, SuperNode key) and the
TLS files, with paths relative to the folder; ``layerfed deploy up`` reads it back.
The SuperLink keeps its state (registered SuperNodes, runs) in ``superlink/state.db``
and ``deploy up`` records which node id each instance's key was registered as in
``superlink/nodes.json``.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerfed.atomic import write_atomic
from layerfed.deploy.node import DeployError
from layerfed.deploy.tls import TlsFiles

__all__ = ["DEPLOY_FILE", "Layout", "Seat"]

DEPLOY_FILE = "deploy.toml"


@dataclass(frozen=True)
class Seat:
    """One instance of the deployment and the SuperNode that serves it."""

    id: str
    layers: tuple[str, ...]
    config: Path
    """Its instance TOML."""
    node_key: Path
    """The SuperNode's private authentication key (``.pub`` beside it)."""

    @property
    def node_public_key(self) -> Path:
        """The public half, registered with the SuperLink."""
        return self.node_key.with_name(self.node_key.name + ".pub")


@dataclass(frozen=True)
class Layout:
    """The files of one local deployment (absolute paths)."""

    folder: Path
    seats: tuple[Seat, ...]
    tls: TlsFiles
    host: str = "127.0.0.1"

    @property
    def run_config(self) -> Path:
        """``run-config.toml``: what ``flwr run`` is given."""
        return self.folder / "run-config.toml"

    @property
    def database(self) -> Path:
        """The SuperLink's state file (``--database``)."""
        return self.folder / "superlink" / "state.db"

    @property
    def node_ids(self) -> Path:
        """Instance id -> the node id its key was registered as."""
        return self.folder / "superlink" / "nodes.json"

    @property
    def policy(self) -> Path:
        """The signed policy."""
        return self.folder / "policy.yaml"

    def _rel(self, path: Path) -> str:
        return str(path.resolve().relative_to(self.folder))

    def save(self) -> Path:
        """Write ``deploy.toml``."""
        lines = [
            "# Written by `layerfed deploy init`; read by `layerfed deploy up` (docs/deployment.md).",
            f"host = {json.dumps(self.host)}",
            "",
            "[tls]",
            f"ca_cert = {json.dumps(self._rel(self.tls.ca_cert))}",
            f"server_cert = {json.dumps(self._rel(self.tls.server_cert))}",
            f"server_key = {json.dumps(self._rel(self.tls.server_key))}",
        ]
        for seat in self.seats:
            lines += [
                "",
                "[[instances]]",
                f"id = {json.dumps(seat.id)}",
                f"layers = [{', '.join(json.dumps(x) for x in seat.layers)}]",
                f"config = {json.dumps(self._rel(seat.config))}",
                f"node_key = {json.dumps(self._rel(seat.node_key))}",
            ]
        path = self.folder / DEPLOY_FILE
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: Path) -> Layout:
        """Read ``folder/deploy.toml``; DeployError naming the file and field."""
        folder = folder.resolve()
        file = folder / DEPLOY_FILE
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
            tls = TlsFiles(
                *(folder / data["tls"][k] for k in ("ca_cert", "server_cert", "server_key"))
            )
            seats = tuple(_seat(folder, entry) for entry in data["instances"])
            host = str(data.get("host", "127.0.0.1"))
        except OSError as e:
            raise DeployError(
                str(file), "a deploy.toml written by `layerfed deploy init`", str(e)
            ) from e
        except (tomllib.TOMLDecodeError, KeyError, TypeError) as e:
            raise DeployError(
                str(file), "tls and [[instances]] with id, layers, config, node_key", repr(e)
            ) from e
        if not seats:
            raise DeployError(f"{file}: instances", "at least one instance", "none")
        return cls(folder, seats, tls, host)

    def recorded_nodes(self) -> dict[str, int]:
        """Instance id -> node id from earlier ``deploy up`` runs (empty when none)."""
        if not self.node_ids.is_file():
            return {}
        data = json.loads(self.node_ids.read_text(encoding="utf-8"))
        return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def record_nodes(self, nodes: dict[str, int]) -> None:
        """Remember which node id each instance's key was registered as."""
        self.node_ids.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({k: str(v) for k, v in sorted(nodes.items())}, indent=2) + "\n"
        write_atomic(self.node_ids, text.encode("utf-8"))


def _seat(folder: Path, entry: Any) -> Seat:
    return Seat(
        id=str(entry["id"]),
        layers=tuple(str(x) for x in entry["layers"]),
        config=folder / entry["config"],
        node_key=folder / entry["node_key"],
    )
