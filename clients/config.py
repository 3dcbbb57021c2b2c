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

    [keys]
    key = "keys/alice.key"
    certificates = "certs"                 # <layer>.json issued by the layer's principal

    [storage]
    journal = "data/journal.sqlite"
    state = "data/state"
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layerfed.clients.events import FieldError
from layerfed.governance.envelope import InstanceCertificate
from layerfed.governance.keys import load_public_key
from layerfed.governance.schema import BaseModelRef, Policy
from layerfed.governance.signing import (
    DEMO_ROOT_KEY,
    is_demo_root,
    read_policy,
    verify_policy_file,
)

__all__ = [
    "ConfigError",
    "InstanceConfig",
    "NodeFields",
    "load_certificates",
    "verified_instance_policy",
]

log = logging.getLogger("layerfed")

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


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
    key: Path | None = None
    certificates: Path | None = None
    journal: Path | None = None
    state: Path | None = None

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
        if "model" in data:
            flat["model"] = data["model"]
        unknown = set(data) - {"instance", "model", *sections}
        if unknown:
            raise ConfigError(sorted(unknown)[0], "a known table", "an unknown one", str(file))
        return cls.parse(flat, where=str(file), root=file.parent)

    @classmethod
    def from_node_config(cls, config: Mapping[str, Any]) -> InstanceConfig:
        """A Flower node config: ``instance-config`` (a TOML path) or flat keys."""
        if "instance-config" in config:
            return cls.load(str(config["instance-config"]))

        def split(value: object) -> list[str]:
            return [p for p in str(value).split(",") if p]

        flat: dict[str, Any] = {
            "instance": {
                "id": config.get("instance-id", ""),
                "jurisdiction": config.get("jurisdiction", "none"),
                "groups": split(config.get("groups", "")),
                "layers": split(config.get("layers", "individual")),
            },
            "policy": config.get("policy", ""),
        }
        for key, name in [
            ("root-key", "root_key"),
            ("trusted", "trusted"),
            ("key-file", "key"),
            ("certificate-dir", "certificates"),
            ("journal", "journal"),
            ("state-dir", "state"),
        ]:
            if config.get(key):
                flat[name] = config[key]
        if config.get("model"):
            model = str(config["model"])
            flat["model"] = (
                {"builtin": model.removeprefix("builtin:")}
                if model.startswith("builtin:")
                else {"path": model}
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
        updates: dict[str, Any] = {}
        for name in ("policy", "root_key", "trusted", "key", "certificates", "journal", "state"):
            value = getattr(config, name)
            if isinstance(value, Path) and not value.is_absolute():
                updates[name] = (root / value).resolve()
        if config.model is not None and config.model.path is not None:
            model_path = Path(config.model.path)
            if not model_path.is_absolute():
                updates["model"] = BaseModelRef(path=str((root / model_path).resolve()))
        return config.model_copy(update=updates)


def verified_instance_policy(config: InstanceConfig, *, deployed: bool = False) -> Policy:
    """The instance's policy, verified against its root key or trusted policy.

    ``deployed`` (a SuperNode's ClientApp) also refuses an unverified policy and the
    demo root key, whose private half is public.
    """
    if deployed and not config.verify:
        raise ConfigError("policy.verify", "true on a deployed node", False)
    if deployed and is_demo_root([load_public_key(config.root_key)] if config.root_key else []):
        raise ConfigError(
            "policy.root_key", "your own root key", f"the demo root {DEMO_ROOT_KEY.name}"
        )
    if not config.verify:
        log.warning("instance %s runs an UNVERIFIED policy", config.instance.id)
        return read_policy(config.policy)
    if config.trusted is not None:
        trusted = verify_policy_file(config.trusted, root_keys=_roots(config))
        return verify_policy_file(config.policy, trusted=trusted)
    if config.root_key is None:
        raise ConfigError(
            "policy.root_key", "a root public key or a trusted policy to verify with", None
        )
    return verify_policy_file(config.policy, root_keys=_roots(config))


def _roots(config: InstanceConfig) -> list[Ed25519PublicKey] | None:
    return [load_public_key(config.root_key)] if config.root_key is not None else None


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
