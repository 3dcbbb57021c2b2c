"""A deployed node's instance: built from its node config, nothing from messages.

The node config (``flower-supernode --node-config``) names an instance TOML or
flat keys (:class:`~layerfed.clients.config.InstanceConfig`). The policy is
verified against the configured root key or trusted policy before any training;
the instance's keys, certificates, journal and state live where the config says.
The run config supplies only the run's seed (the slots' frozen A matrices); records
in a message (such as the gym's ``lf.settings``) are never read. A task whose
``policy_hash`` is not this node's verified policy's hash is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import Context, Message

from layerfed.clients.config import (
    ConfigError,
    InstanceConfig,
    load_certificates,
    verified_instance_policy,
)
from layerfed.clients.instance import Instance
from layerfed.clients.journal import FeedbackJournal
from layerfed.clients.source import InstanceSource, NodeRuntime
from layerfed.clients.synced import SYNCED_DIR, SyncedSlots
from layerfed.governance.canonical import policy_hash
from layerfed.governance.keys import load_private_key, load_public_key
from layerfed.layers.base import load_base
from layerfed.layers.instance_disk import InstanceDisk
from layerfed.layers.stack import LayerStack
from layerfed.wire.protocol import Identity, Task

__all__ = ["NodeSource"]

log = logging.getLogger("layerfed")


class NodeSource(InstanceSource):
    """One instance per node, configured by its node config (deployment)."""

    def __init__(self) -> None:
        self._config: InstanceConfig | None = None
        self._runtime: NodeRuntime | None = None
        self._instance: Instance | None = None
        self._synced: SyncedSlots | None = None

    def config(self, context: Context) -> InstanceConfig:
        """The node's instance config (read once)."""
        if self._config is None:
            self._config = InstanceConfig.from_node_config(context.node_config)
        return self._config

    def runtime(self, msg: Message, context: Context) -> NodeRuntime:
        """The verified policy, the base model and its stack (built once per process)."""
        if self._runtime is None:
            config = self.config(context)
            policy = verified_instance_policy(config, deployed=True)
            torch.set_num_threads(1)
            model, tokenizer = load_base(
                config.model or policy.base_model,
                root=config.policy.parent,
                device=config.device,
                dtype=config.dtype,
            )
            seed = int(context.run_config.get("layerfed-seed", 0))
            self._runtime = NodeRuntime(
                policy, LayerStack(policy, model, tokenizer, seed), policy_hash=policy_hash(policy)
            )
        return self._runtime

    def identity(
        self, msg: Message, context: Context, rt: NodeRuntime, task: Task | None
    ) -> Identity:
        """The identity the node config declares."""
        node = self.config(context).instance
        return Identity(0, node.id, node.jurisdiction, node.groups, node.layers)

    def instance(
        self, msg: Message, context: Context, rt: NodeRuntime, identity: Identity
    ) -> Instance:
        """The node's instance (kept across messages: its journal stays open)."""
        if self._instance is None:
            config = self.config(context)
            if config.key is None:
                raise ConfigError("keys.key", "the instance's private key file", None)
            journal_path = config.journal or self._state(config) / "journal.sqlite"
            journal_path.parent.mkdir(parents=True, exist_ok=True)
            self._instance = Instance(
                rt.policy,
                instance_id=identity.instance_id,
                jurisdiction=identity.jurisdiction,
                groups=identity.groups,
                stack=rt.stack,
                journal=FeedbackJournal(journal_path),
                key=load_private_key(config.key),
                certificates=load_certificates(config.certificates),
                layers=identity.layers,
                people=config.people,
            )
        return self._instance

    def disk(self, context: Context, identity: Identity) -> InstanceDisk:
        """``<state>/slots``."""
        return InstanceDisk(self._state(self.config(context)) / "slots")

    def synced(self, context: Context, identity: Identity) -> SyncedSlots | None:
        """``<state>/synced``, verified against ``[sync] server_key`` (no state: nowhere)."""
        config = self.config(context)
        if config.state is None:
            return None
        if self._synced is None:
            key = load_public_key(config.server_key) if config.server_key is not None else None
            self._synced = SyncedSlots(config.state / SYNCED_DIR, key, config.sync_keep)
        return self._synced

    @staticmethod
    def _state(config: InstanceConfig) -> Path:
        if config.state is None:
            raise ConfigError("storage.state", "a folder for the instance's state", None)
        return config.state
