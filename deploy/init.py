"""``layerfed deploy init``: a local deployment's every file, from nothing, in one folder.

Keys (the policy's root, the server's checkpoint key, one delegating key per layer,
each instance's key and certificates), TLS material and SuperNode authentication keys,
a policy for the model with those keys, signed, one instance TOML per instance
(``[sync]`` trusting the server key), a run config, ``deploy.toml`` (what
``layerfed deploy up`` starts) and ``run.sh``. Nothing is downloaded; no placeholder
key is left. The layout (docs/deployment.md, "One command")::

    DIR/
      deploy.toml  run-config.toml  run.sh
      policy.yaml  policy.yaml.sig.json  probes.jsonl
      model -> PATH                      (a symlink; absent for builtin:NAME)
      keys/   root.pem (keep offline)  root.pub.pem  server.pem  server.pub.pem  <layer>-fleet.pem
      tls/    ca.crt  server.pem  server.key
      node-keys/<id>  <id>.pub           (SuperNode authentication, OpenSSH EC)
      instances/<id>/instance.toml  keys/instance.pem  certs/<layer>.json  data/
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from layerfed.deploy.layout import Layout, Seat
from layerfed.deploy.node import DeployError
from layerfed.deploy.templates import LAYERS, family_of, policy_document
from layerfed.deploy.tls import make_supernode_key, make_tls_files
from layerfed.governance.envelope import certify_instance
from layerfed.governance.keys import KeyPair, generate_keypair, load_private_key
from layerfed.governance.signing import sign_policy_file
from layerfed.layers.params import read_model_params

__all__ = ["InitOptions", "init_deployment"]

log = logging.getLogger("layerfed")
SHARED = tuple(layer for layer in LAYERS if layer != "individual")


@dataclass(frozen=True)
class InitOptions:
    """What ``deploy init`` is asked for."""

    model: str
    """``builtin:NAME`` or a local Hugging Face folder."""
    instances: int = 2
    layers: tuple[str, ...] | None = None
    """Layers every instance gives feedback to; None: instance i gets the i-th shared layer
    (creator, community, creator, ...) and ``individual``."""
    rounds: int = 2
    seed: int = 0
    host: str = "127.0.0.1"


def _check(options: InitOptions, folder: Path) -> None:
    if options.instances < 1 or options.instances > 64:
        raise DeployError("--instances", "1 to 64", str(options.instances))
    if options.rounds < 1:
        raise DeployError("--rounds", "a positive number", str(options.rounds))
    if options.layers is not None:
        unknown = [layer for layer in options.layers if layer not in LAYERS]
        if unknown or not options.layers:
            raise DeployError(
                "--layers",
                f"a comma-separated subset of {list(LAYERS)}",
                ",".join(unknown) or "none",
            )
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DeployError(
            str(folder), "a new or empty folder (keys are never overwritten)", "files"
        )


def _model(options: InitOptions, folder: Path) -> tuple[dict[str, str], list[str]]:
    """The policy's ``base_model`` and the model's parameter names (a folder is linked)."""
    model = options.model
    if model.startswith("builtin:"):
        names = list(read_model_params(model).names)
        return {"builtin": model.removeprefix("builtin:")}, names
    source = Path(model).expanduser().resolve()
    if not (source / "config.json").is_file():
        raise DeployError(
            "--model", "builtin:NAME or a Hugging Face folder with config.json", model
        )
    names = list(read_model_params(str(source)).names)
    (folder / "model").symlink_to(source, target_is_directory=True)
    return {"path": "model"}, names


def _principals(root: KeyPair, fleets: dict[str, KeyPair]) -> list[dict[str, Any]]:
    first = {"name": "creator_root", "layer": "creator", "public_key": root.public_key}
    return [
        first,
        *(
            {
                "name": f"{layer}_fleet",
                "layer": layer,
                "delegates_to_instances": True,
                "public_key": pair.public_key,
            }
            for layer, pair in fleets.items()
        ),
    ]


def _write_policy(folder: Path, document: dict[str, Any], root: KeyPair) -> Path:
    policy = folder / "policy.yaml"
    header = (
        "# Written by `layerfed deploy init` with this deployment's own keys, then signed by\n"
        "# keys/root.pem. Edit it, then sign again:\n"
        "#   layerfed policy sign policy.yaml --key keys/root.pem\n"
        "# The red-line threshold suits a model with random weights; set a real bar for yours.\n"
    )
    policy.write_text(header + yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    probes = resources.files("layerfed.examples.deployment").joinpath("probes.jsonl")
    (folder / "probes.jsonl").write_text(probes.read_text(encoding="utf-8"), encoding="utf-8")
    sign_policy_file(policy, load_private_key(root.private_path))
    return policy


def _instance_layers(options: InitOptions, index: int) -> tuple[str, ...]:
    if options.layers is not None:
        return options.layers
    return (SHARED[index % len(SHARED)], "individual")


def _toml_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _write_instance(
    folder: Path, iid: str, layers: tuple[str, ...], fleets: dict[str, KeyPair]
) -> Path:
    home = folder / "instances" / iid
    key = generate_keypair("instance", home / "keys")
    public = load_private_key(key.private_path).public_key()
    (home / "certs").mkdir(parents=True)
    for layer in layers:
        issuer = load_private_key(fleets[layer].private_path)
        cert = certify_instance(iid, public, layer, f"{layer}_fleet", issuer)
        (home / "certs" / f"{layer}.json").write_text(cert.model_dump_json(), encoding="utf-8")
    config = home / "instance.toml"
    config.write_text(
        f"""# Instance {iid} (docs/deployment.md). Relative paths resolve against this folder.
[instance]
id = "{iid}"
jurisdiction = "none"
layers = {_toml_list(layers)}  # the layers this instance gives feedback to

[policy]
file = "../../policy.yaml"
root_key = "../../keys/root.pub.pem"

[keys]
key = "keys/instance.pem"
certificates = "certs"

[storage]
journal = "data/journal.sqlite"
state = "data/state"

[sync]
server_key = "../../keys/server.pub.pem"  # verifies the committed versions the server sends
keep = 3                                  # versions of each synced shared slot kept
""",
        encoding="utf-8",
    )
    return config


def _write_run_files(folder: Path, options: InitOptions) -> None:
    (folder / "run-config.toml").write_text(
        f"""# The run config `layerfed deploy up` passes to `flwr run` (docs/deployment.md).
# Relative paths resolve in this folder (the SuperLink's working directory).
layerfed-policy = "policy.yaml"
layerfed-root-key = "keys/root.pub.pem"
layerfed-server-key = "keys/server.pem"
layerfed-out = "out"
layerfed-rounds = {options.rounds}
layerfed-seed = {options.seed}
""",
        encoding="utf-8",
    )
    script = folder / "run.sh"
    script.write_text(
        "#!/bin/sh\n"
        "# Start the SuperLink and SuperNodes on 127.0.0.1 (TLS, SuperNode authentication),\n"
        "# run, report, and stop every process started, by PID. Extra arguments go to\n"
        "# `layerfed deploy up`, e.g. --set layerfed-rounds=3\n"
        'cd "$(dirname "$0")" || exit 1\n'
        f'exec {shlex.quote(sys.executable)} -m layerfed.cli deploy up . "$@"\n',
        encoding="utf-8",
    )
    script.chmod(0o755)


def init_deployment(folder: Path, options: InitOptions) -> Layout:
    """Write a local deployment into ``folder`` (new or empty); its :class:`Layout`."""
    _check(options, folder)
    folder.mkdir(parents=True, exist_ok=True)
    base_model, names = _model(options, folder)
    family = family_of(options.model, names)
    keys = folder / "keys"
    root = generate_keypair("root", keys)
    generate_keypair("server", keys)
    fleets = {layer: generate_keypair(f"{layer}-fleet", keys) for layer in LAYERS}
    document = policy_document(
        family, names, base_model=base_model, principals=_principals(root, fleets)
    )
    _write_policy(folder, document, root)
    tls = make_tls_files(folder / "tls", options.host)
    seats = []
    for i in range(options.instances):
        iid = f"instance-{i + 1}"
        layers = _instance_layers(options, i)
        config = _write_instance(folder, iid, layers, fleets)
        node_key, _ = make_supernode_key(folder / "node-keys", iid)
        seats.append(Seat(iid, layers, config, node_key))
    _write_run_files(folder, options)
    layout = Layout(folder.resolve(), tuple(seats), tls, options.host)
    layout.save()
    log.info("deployment written to %s (%s instances, %s)", folder, len(seats), family.name)
    return layout
