"""Local deployments for tests, demos and a first look: a SuperLink and SuperNodes as processes.

A layer above :mod:`layerfed.clients` and :mod:`layerfed.federation` (beside the gym):
:class:`~layerfed.deploy.local.LocalDeployment` starts real Flower processes and stops
them by PID; :class:`~layerfed.deploy.node.NodeSpec` writes each SuperNode's node
config in the schema the ClientApp reads (:mod:`layerfed.wire.node_config`);
:mod:`layerfed.deploy.tls` makes throw-away TLS material; :func:`init_deployment`
(``layerfed deploy init``) writes a whole deployment into a folder and :func:`deploy_up`
(``layerfed deploy up``) starts, runs and stops it. Names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfed._lazy import lazy_getattr

if TYPE_CHECKING:
    from layerfed.deploy.init import InitOptions, init_deployment
    from layerfed.deploy.layout import Layout, Seat
    from layerfed.deploy.local import CONNECTION, LocalDeployment, pid_running
    from layerfed.deploy.node import DeployError, NodeSpec, free_port, run_config_string
    from layerfed.deploy.tls import TlsFiles, make_supernode_key, make_tls_files
    from layerfed.deploy.up import UpResult, deploy_up, merged_run_config

__all__ = [
    "CONNECTION",
    "DeployError",
    "InitOptions",
    "Layout",
    "LocalDeployment",
    "NodeSpec",
    "Seat",
    "TlsFiles",
    "UpResult",
    "deploy_up",
    "free_port",
    "init_deployment",
    "make_supernode_key",
    "make_tls_files",
    "merged_run_config",
    "pid_running",
    "run_config_string",
]

_HOMES: dict[str, str] = {
    "CONNECTION": "layerfed.deploy.local",
    "DeployError": "layerfed.deploy.node",
    "InitOptions": "layerfed.deploy.init",
    "Layout": "layerfed.deploy.layout",
    "LocalDeployment": "layerfed.deploy.local",
    "NodeSpec": "layerfed.deploy.node",
    "Seat": "layerfed.deploy.layout",
    "TlsFiles": "layerfed.deploy.tls",
    "UpResult": "layerfed.deploy.up",
    "deploy_up": "layerfed.deploy.up",
    "free_port": "layerfed.deploy.node",
    "init_deployment": "layerfed.deploy.init",
    "make_supernode_key": "layerfed.deploy.tls",
    "make_tls_files": "layerfed.deploy.tls",
    "merged_run_config": "layerfed.deploy.up",
    "pid_running": "layerfed.deploy.local",
    "run_config_string": "layerfed.deploy.node",
}
"""Where each public name lives."""


__getattr__ = lazy_getattr("layerfed.deploy", _HOMES, globals())
