"""``layerfed deploy up``: start a deployment ``deploy init`` wrote, run it, stop it by PID.

One SuperLink on 127.0.0.1 with TLS, SuperNode authentication and a persistent state
file (``--database``, so registrations survive a restart), one SuperNode per instance,
``flwr run`` with the folder's run config, then every process started is stopped by
PID (:class:`~layerfed.deploy.local.LocalDeployment`). A SuperNode key is registered
only when the SuperLink does not already know the node id recorded for it.

Overrides go into the one ``--run-config`` value ``flwr run`` is given: Flower refuses a
TOML file combined with ``key=value`` pairs, so the file's keys and the overrides are
merged here and passed as pairs (:func:`merged_run_config`).
"""

from __future__ import annotations

import json
import logging
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerfed.deploy.layout import Layout
from layerfed.deploy.local import LocalDeployment
from layerfed.deploy.node import DeployError, NodeSpec
from layerfed.federation.run_config import RunConfigError, RunSettings

__all__ = ["UpResult", "app_folder", "deploy_up", "merged_run_config"]

log = logging.getLogger("layerfed")


@dataclass(frozen=True)
class UpResult:
    """What one ``deploy up`` did."""

    run_id: int
    status: str
    """Flower's final status, ``finished:completed`` when the run succeeded."""
    out: Path
    """The ServerApp's output folder (audit, checkpoint, report)."""
    nodes: dict[str, int]
    """Instance id -> SuperNode id."""
    registered: tuple[str, ...]
    """Instances whose key was registered by this call (the others were already known)."""
    pids: tuple[int, ...]
    """Every process started (and the helpers Flower started under them)."""


def merged_run_config(file: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The run config file's keys with ``overrides`` on top, checked as :class:`RunSettings`."""
    try:
        config: dict[str, Any] = tomllib.loads(file.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise DeployError(str(file), "a readable run config TOML", str(e)) from e
    config.update(overrides)
    unknown = sorted(set(config) - set(RunSettings().to_config()))
    if unknown:
        raise DeployError(str(file), "run-config keys RunSettings knows", ", ".join(unknown))
    try:
        RunSettings.from_config(config)
    except RunConfigError as e:
        raise DeployError(str(file), "run-config keys RunSettings knows", str(e)) from e
    return config


def app_folder() -> Path:
    """The Flower App ``flwr run`` submits: the layerfed checkout (its pyproject.toml)."""
    folder = Path(__file__).resolve().parent.parent
    if not (folder / "pyproject.toml").is_file():
        raise DeployError("flwr run", "a layerfed checkout with pyproject.toml", str(folder))
    return folder


def _register(
    dep: LocalDeployment, layout: Layout, say: Callable[[str], None]
) -> tuple[dict[str, int], list[str]]:
    known = {int(n["node-id"]) for n in dep.registered() if n.get("status") != "unregistered"}
    nodes = layout.recorded_nodes()
    fresh = []
    for seat in layout.seats:
        if nodes.get(seat.id) in known:
            say(f"{seat.id}: registered before as node {nodes[seat.id]}")
            continue
        nodes[seat.id] = dep.register(seat.node_public_key)
        fresh.append(seat.id)
        say(f"{seat.id}: registered as node {nodes[seat.id]}")
    layout.record_nodes(nodes)
    return nodes, fresh


def deploy_up(
    folder: Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    timeout: float = 1800.0,
    say: Callable[[str], None] = print,
) -> UpResult:
    """Start, run and stop the deployment in ``folder``; DeployError when the run fails."""
    layout = Layout.load(folder)
    config = merged_run_config(layout.run_config, overrides or {})
    app = app_folder()
    with LocalDeployment(
        layout.folder,
        tls=layout.tls,
        node_auth=True,
        host=layout.host,
        database=layout.database,
    ) as dep:
        dep.start_superlink()
        say(f"SuperLink on {dep.address} (pid {dep.processes['superlink'].pid}), TLS, node auth")
        nodes, fresh = _register(dep, layout, say)
        for seat in layout.seats:
            dep.start_supernode(NodeSpec.from_instance_config(seat.config, auth_key=seat.node_key))
        run_id = dep.run(app, config)
        say(f"run {run_id} started; logs in {layout.folder / 'logs'}")
        status = dep.wait_finished(run_id, timeout)
        pids = tuple(dep.process_tree())
        say(f"run {run_id}: {status}")
        if status != "finished:completed":
            log.error("run %s: %s\n%s", run_id, status, _tail(dep.run_log(run_id)))
    out = Path(str(config.get("layerfed-out", "runs/deploy")))
    out = out if out.is_absolute() else layout.folder / out
    say(f"stopped {len(pids)} processes by PID ({' '.join(map(str, pids))}); output in {out}")
    if status != "finished:completed":
        raise DeployError(
            f"run {run_id}", "finished:completed", f"{status}; see {layout.folder / 'logs'}"
        )
    _summary(out, say)
    return UpResult(run_id, status, out, nodes, tuple(fresh), pids)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _summary(out: Path, say: Callable[[str], None]) -> None:
    """One line per committed slot version (from the audit) and the report, if written."""
    audit = out / "audit.jsonl"
    if audit.is_file():
        for line in audit.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("kind") == "commit":
                fields = record.get("fields", {})
                say(
                    f"committed {fields.get('slot')} v{fields.get('version')} (round {fields.get('round')})"
                )
    for name in ("report.md", "report.html"):
        if (out / name).is_file():
            say(f"report: {out / name}")
