"""An instance's configuration: who it is, which policy it trusts, its model, keys and disk.

Written as TOML (``layerfed instance serve --config INSTANCE.toml``, a deployed
SuperNode's ``--node-config "instance-config='INSTANCE.toml'"``) or given as flat
node-config keys. Relative paths resolve against the TOML file's folder::

    [instance]
    id = "alice"
    jurisdiction = "eu"
    groups = ["clinic"]
    layers = ["individual", "in_group"]   # the layers this instance gives feedback to

    [policy]
    file = "policy.yaml"
    root_key = "keys/creator.pub"          # or: trusted = "previous-policy.yaml"

    [model]
    path = "models/my-llama"               # or: builtin = "tiny"; default: the policy's
    device = "auto"                        # auto | cpu | cuda | cuda:N | mps (default cpu)
    dtype = "bfloat16"                     # float32 (default) | bfloat16 | float16

    [keys]
    key = "keys/alice.key"
    certificates = "certs"                 # <layer>.json issued by the layer's principal

    [storage]
    journal = "data/journal.sqlite"
    state = "data/state"                   # synced shared slots: <state>/synced

    [sync]
    server_key = "keys/server.pub.pem"     # the run's server key: verifies synced slots
    keep = 3                               # versions of each synced slot kept

    [people]                               # person id -> roles (the policy routes roles)
    dana = ["creator"]                     # the creator's rater: her feedback trains creator
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layerfed.clients.events import FieldError
from layerfed.governance.envelope import InstanceCertificate
from layerfed.governance.schema import BaseModelRef, Policy
from layerfed.governance.trust import (
    DEPLOYMENT,
    RESEARCH,
    TrustRequest,
    TrustSetting,
    TrustSetupError,
    verify_trust,
)
from layerfed.layers.device import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DeviceSettingError,
    check_device,
    check_dtype,
)
from layerfed.wire.node_config import NodeConfig, NodeConfigError

__all__ = [
    "NODE_CONFIG_FIELDS",
    "ConfigError",
    "InstanceConfig",
    "NodeFields",
    "load_certificates",
    "trust_request",
    "verified_instance_policy",
]

log = logging.getLogger("layerfed")

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NODE_FIELDS = {"certificates": "certificate_dir", "state": "state_dir"}
"""Instance config field -> :class:`NodeConfig` field, where they differ."""


class ConfigError(FieldError):
    """An instance config is missing, unreadable or has a bad field (names file and field)."""


class NodeFields(BaseModel):
    """Identity fields of an instance."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str = Field(pattern=NAME)
    jurisdiction: str = Field(default="none", pattern=NAME)
    groups: tuple[str, ...] = ()
    layers: tuple[str, ...] = ("individual",)


class InstanceConfig(BaseModel):
    """Everything needed to build (or restore) one deployed :class:`Instance`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    instance: NodeFields
    policy: Path
    root_key: Path | None = None
    trusted: Path | None = None
    verify: bool = True
    model: BaseModelRef | None = None
    device: str = DEFAULT_DEVICE
    """Where the base runs (:mod:`layerfed.layers.device`); a deployment setting."""
    dtype: str = DEFAULT_DTYPE
    """The base's dtype; slots stay float32 whatever it is."""
    key: Path | None = None
    certificates: Path | None = None
    journal: Path | None = None
    state: Path | None = None
    server_key: Path | None = None
    """The run's server public key; synced shared slots are saved only when it signed them."""
    sync_keep: int = Field(default=3, ge=1)
    """Versions of each synced slot kept under ``<state>/synced``."""
    people: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    """Person id -> the roles their feedback may be given in (``feedback(person=...)``)."""

    @classmethod
    def load(cls, path: str | Path) -> InstanceConfig:
        """Read a TOML instance config; :class:`ConfigError` naming the file and field."""
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError("file", "a readable TOML file", str(e), str(file)) from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("toml", "valid TOML", str(e), str(file)) from e
        flat: dict[str, Any] = {"instance": data.get("instance", {})}
        sections = {
            "policy": {"file": "policy", "root_key": "root_key", "trusted": "trusted"},
            "keys": {"key": "key", "certificates": "certificates"},
            "storage": {"journal": "journal", "state": "state"},
            "sync": {"server_key": "server_key", "keep": "sync_keep"},
        }
        for section, names in sections.items():
            table = data.get(section, {})
            if not isinstance(table, dict):
                raise ConfigError(section, "a table", table, str(file))
            for key, value in table.items():
                if key == "verify" and section == "policy":
                    flat["verify"] = value
                elif key in names:
                    flat[names[key]] = value
                else:
                    raise ConfigError(f"{section}.{key}", f"one of {sorted(names)}", key, str(file))
        if "people" in data:
            people = data["people"]
            if not isinstance(people, dict):
                raise ConfigError("people", "a table of person id -> roles", people, str(file))
            flat["people"] = {k: [v] if isinstance(v, str) else v for k, v in people.items()}
        if "model" in data:
            model = data["model"]
            if not isinstance(model, dict):
                raise ConfigError("model", "a table", model, str(file))
            model = dict(model)
            for name in ("device", "dtype"):
                if name in model:
                    flat[name] = model.pop(name)
            if model:
                flat["model"] = model
        unknown = set(data) - {"instance", "model", "people", *sections}
        if unknown:
            raise ConfigError(sorted(unknown)[0], "a known table", "an unknown one", str(file))
        return cls.parse(flat, where=str(file), root=file.parent)

    @classmethod
    def from_node_config(cls, config: Mapping[str, Any]) -> InstanceConfig:
        """A Flower node config (:class:`~layerfed.wire.node_config.NodeConfig`): an
        ``instance-config`` TOML path, or flat keys."""
        try:
            node = NodeConfig.parse(config)
        except NodeConfigError as e:
            raise ConfigError(e.key, e.expected, e.got, "node config") from e
        if node.instance_config is not None:
            return cls.load(node.instance_config)
        flat: dict[str, Any] = {
            "instance": {
                "id": node.instance_id,
                "jurisdiction": node.jurisdiction,
                "groups": list(node.groups),
                "layers": list(node.layers),
            },
            "policy": node.policy,
        }
        for name in ("root_key", "trusted", "certificates", "journal", "state"):
            value = getattr(node, _NODE_FIELDS.get(name, name))
            if value is not None:
                flat[name] = value
        if node.key_file is not None:
            flat["key"] = node.key_file
        if node.server_key is not None:
            flat["server_key"] = node.server_key
        if node.sync_keep is not None:
            flat["sync_keep"] = node.sync_keep
        for name in ("device", "dtype"):
            if getattr(node, name) is not None:
                flat[name] = getattr(node, name)
        if node.model is not None:
            flat["model"] = (
                {"builtin": node.model.removeprefix("builtin:")}
                if node.model.startswith("builtin:")
                else {"path": node.model}
            )
        return cls.parse(flat, where="node config", root=Path.cwd())

    @classmethod
    def parse(cls, data: Mapping[str, Any], *, where: str, root: Path) -> InstanceConfig:
        """Validate ``data``; relative paths resolve against ``root``."""
        try:
            config = cls.model_validate(dict(data))
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            field = ".".join(str(p) for p in first["loc"])
            raise ConfigError(field, first["msg"], first.get("input"), where) from e
        try:
            check_device(config.device, setting="model.device")
            check_dtype(config.dtype, setting="model.dtype")
        except DeviceSettingError as e:
            raise ConfigError(e.setting, e.expected, e.got, where) from e
        updates: dict[str, Any] = {}
        paths = ("policy", "root_key", "trusted", "key", "certificates", "journal", "state")
        for name in (*paths, "server_key"):
            value = getattr(config, name)
            if isinstance(value, Path) and not value.is_absolute():
                updates[name] = (root / value).resolve()
        if config.model is not None and config.model.path is not None:
            model_path = Path(config.model.path)
            if not model_path.is_absolute():
                updates["model"] = BaseModelRef(path=str((root / model_path).resolve()))
        return config.model_copy(update=updates)


NODE_CONFIG_FIELDS = {
    TrustSetting.ROOT_KEY: "policy.root_key",
    TrustSetting.TRUSTED: "policy.trusted",
    TrustSetting.VERIFY: "policy.verify",
}
"""How an instance config spells each setting a trust refusal names."""


def trust_request(config: InstanceConfig, *, deployed: bool = False) -> TrustRequest:
    """The one trust decision's inputs for this instance (``deployed``: nothing relaxed)."""
    return TrustRequest(
        policy=config.policy,
        root_keys=(config.root_key,) if config.root_key is not None else (),
        trusted=config.trusted,
        verify=config.verify,
        rules=DEPLOYMENT if deployed else RESEARCH,
    )


def verified_instance_policy(config: InstanceConfig, *, deployed: bool = False) -> Policy:
    """The instance's policy, by the same trust decision the server makes.

    ``deployed`` (a SuperNode's ClientApp) refuses an unverified policy and the demo
    root key, whose private half is public (:class:`ConfigError` naming the field);
    a local, undeployed instance may use either (logged).
    """
    try:
        return verify_trust(trust_request(config, deployed=deployed))
    except TrustSetupError as e:
        raise ConfigError(NODE_CONFIG_FIELDS[e.setting], e.expected, e.got) from e


def load_certificates(folder: Path | None) -> dict[str, InstanceCertificate]:
    """``<layer>.json`` certificates of a folder, by layer."""
    if folder is None:
        return {}
    if not folder.is_dir():
        raise ConfigError("keys.certificates", "a folder of <layer>.json files", str(folder))
    certs: dict[str, InstanceCertificate] = {}
    for file in sorted(folder.glob("*.json")):
        cert = InstanceCertificate.model_validate_json(file.read_text(encoding="utf-8"))
        certs[cert.layer] = cert
    return certs
