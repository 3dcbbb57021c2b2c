"""Local deployments for tests, demos and a first look: a SuperLink and SuperNodes as processes.

A layer above :mod:`layerfed.clients` and :mod:`layerfed.federation` (beside the gym):
:class:`~layerfed.deploy.local.LocalDeployment` starts real Flower processes and stops
them by PID; :class:`~layerfed.deploy.node.NodeSpec` writes each SuperNode's node
config in the schema the ClientApp reads (:mod:`layerfed.wire.node_config`);
:mod:`layerfed.deploy.tls` makes throw-away TLS material. Names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfed._lazy import lazy_getattr

if TYPE_CHECKING:
    from layerfed.deploy.local import CONNECTION, LocalDeployment, pid_running
    from layerfed.deploy.node import DeployError, NodeSpec, free_port, run_config_string
    from layerfed.deploy.tls import TlsFiles, make_supernode_key, make_tls_files

__all__ = [
    "CONNECTION",
    "DeployError",
    "LocalDeployment",
    "NodeSpec",
    "TlsFiles",
    "free_port",
    "make_supernode_key",
    "make_tls_files",
    "pid_running",
    "run_config_string",
]

_HOMES: dict[str, str] = {
    "CONNECTION": "layerfed.deploy.local",
    "DeployError": "layerfed.deploy.node",
    "LocalDeployment": "layerfed.deploy.local",
    "NodeSpec": "layerfed.deploy.node",
    "TlsFiles": "layerfed.deploy.tls",
    "free_port": "layerfed.deploy.node",
    "make_supernode_key": "layerfed.deploy.tls",
    "make_tls_files": "layerfed.deploy.tls",
    "pid_running": "layerfed.deploy.local",
    "run_config_string": "layerfed.deploy.node",
}
"""Where each public name lives."""


__getattr__ = lazy_getattr("layerfed.deploy", _HOMES, globals())
