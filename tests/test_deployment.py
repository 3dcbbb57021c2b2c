"""Deployment on real Flower processes: SuperLink + three SuperNodes on 127.0.0.1, `flwr run`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import layerfed
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.common.config import parse_config_args
from hypothesis import given
from hypothesis import strategies as st
from layerfed.federation.deploy import (
    DeployError,
    LocalDeployment,
    NodeSpec,
    make_supernode_key,
    make_tls_files,
    pid_running,
    run_config_string,
)
from layerfed.federation.settings import RunSettings
from layerfed.governance.audit import verify_audit
from layerfed.governance.envelope import certify_instance
from layerfed.governance.keys import public_key_string
from layerfed.governance.signing import sign_policy_file
from policy_helpers import default_data, write_yaml

REPO = Path(layerfed.__file__).resolve().parent
SCENARIO = REPO / "examples" / "deployment" / "scenario.yaml"
ROUNDS = 2

_text = st.text(
    alphabet=st.characters(blacklist_characters='"\\', blacklist_categories=("Cc", "Cs")),
    max_size=30,
)
_values = st.one_of(st.booleans(), st.integers(-(2**40), 2**40), _text)


@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True), _values))
def test_run_config_string_parses_back_in_flower(values: dict[str, Any]) -> None:
    """What run_config_string writes, Flower's own --run-config parser reads back unchanged."""
    assert parse_config_args([run_config_string(values)]) == values


@pytest.mark.parametrize("bad", ['say "hi"', "a\\b", "line\nbreak"])
def test_run_config_string_refuses_unquotable_strings(bad: str) -> None:
    """A string Flower's parser cannot carry is refused with the key named, not mangled."""
    with pytest.raises(DeployError, match="layerfed-out"):
        run_config_string({"layerfed-out": bad})


def test_pyproject_run_config_defaults_give_builtin_settings() -> None:
    """The [tool.flwr.app.config] defaults read back as the built-in RunSettings."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    flwr = config["tool"]["flwr"]["app"]
    assert flwr["components"]["serverapp"] == "layerfed.federation.server_app:server_app"
    assert flwr["components"]["clientapp"] == "layerfed.federation.client_app:client_app"
    assert set(flwr["config"]) == set(RunSettings().to_config())
    assert RunSettings.from_config(flwr["config"]) == RunSettings(out="runs/deploy")


def test_node_auth_without_tls_is_refused(tmp_path: Path) -> None:
    """Asking for SuperNode authentication without TLS fails before any process starts."""
    with pytest.raises(DeployError, match="TLS"):
        LocalDeployment(tmp_path, node_auth=True)


# -- the end-to-end run ----------------------------------------------------------------


def _pem(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _signed_policy(tmp: Path, fleets: dict[str, Ed25519PrivateKey]) -> tuple[Path, Path]:
    """A policy whose creator_root is a fresh key and whose layers delegate to instances."""
    root = Ed25519PrivateKey.generate()
    data = default_data()
    data["principals"] = [
        {"name": "creator_root", "layer": "creator", "public_key": _pub(root)},
        *(
            {
                "name": f"{layer}_fleet",
                "layer": layer,
                "public_key": _pub(key),
                "delegates_to_instances": True,
            }
            for layer, key in fleets.items()
        ),
    ]
    path = write_yaml(tmp, data)
    sign_policy_file(path, root)
    root_pub = tmp / "root.pub.pem"
    root_pub.write_bytes(
        root.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path, root_pub


def _pub(key: Ed25519PrivateKey) -> str:
    return public_key_string(key.public_key())


def _nodes(tmp: Path, fleets: dict[str, Ed25519PrivateKey]) -> list[NodeSpec]:
    """The scenario's instances, each with its own key and certificates for its layers."""
    scenario = yaml.safe_load(SCENARIO.read_text(encoding="utf-8"))
    nodes = []
    for index, spec in enumerate(scenario["instances"]):
        folder = tmp / "instances" / spec["id"]
        (folder / "certs").mkdir(parents=True)
        key = Ed25519PrivateKey.generate()
        for layer in spec["layers"]:
            cert = certify_instance(
                spec["id"], key.public_key(), layer, f"{layer}_fleet", fleets[layer]
            )
            (folder / "certs" / f"{layer}.json").write_text(cert.model_dump_json())
        nodes.append(
            NodeSpec(
                instance_id=spec["id"],
                index=index,
                jurisdiction=spec["jurisdiction"],
                groups=tuple(spec["groups"]),
                layers=tuple(spec["layers"]),
                state_dir=folder / "state",
                key_file=_pem(key, folder / "instance.pem"),
                certificate_dir=folder / "certs",
            )
        )
    return nodes


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[LocalDeployment]:
    """A TLS SuperLink with SuperNode auth; every process it starts is stopped by PID."""
    tls = make_tls_files(tmp_path / "tls")
    with LocalDeployment(tmp_path / "deploy", tls=tls, node_auth=True) as dep:
        yield dep


@pytest.mark.slow
def test_two_rounds_on_superlink_and_three_supernodes(
    tmp_path: Path, deployment: LocalDeployment
) -> None:
    """`flwr run` on a real SuperLink and 3 SuperNodes commits 2 rounds with an intact audit log."""
    layers = ("creator", "government", "individual")
    fleets = {layer: Ed25519PrivateKey.generate() for layer in layers}
    policy, root_pub = _signed_policy(tmp_path, fleets)
    deployment.start_superlink()
    registered = []
    for node in _nodes(tmp_path, fleets):
        private, public = make_supernode_key(tmp_path / "node-keys", node.instance_id)
        registered.append(deployment.register(public))
        deployment.start_supernode(replace(node, auth_key=private))
    out = tmp_path / "out"
    run_id = deployment.run(
        REPO,
        {
            "layerfed-policy": str(policy),
            "layerfed-root-key": str(root_pub),
            "layerfed-scenario": str(SCENARIO),
            "layerfed-out": str(out),
            "layerfed-rounds": ROUNDS,
            "layerfed-simulated-keys": False,
        },
    )
    status = deployment.wait_finished(run_id, timeout=480)
    tree = deployment.process_tree()
    assert status == "finished:completed", _logs(deployment)

    state = json.loads((out / "state" / "state.json").read_text())
    assert state["round"] == ROUNDS
    assert {"creator/global", "government/eu"} <= set(state["committed"])
    report = verify_audit(out / "audit.jsonl", anchor=state["audit_head"])
    assert report.ok, report.reason
    records = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "policy_load" and kinds[-1] == "run_end"
    assert kinds.count("round_start") == ROUNDS and "commit" in kinds
    senders = {r["fields"]["instance"] for r in records if r["kind"] == "update_received"}
    assert senders == {"node-0", "node-1", "node-2"}
    layers_seen = [m["layers"][name] for m in state["metrics"] for name in m["layers"]]
    assert layers_seen and all(x["refused"] == {} for x in layers_seen)
    assert all(x["accepted"] == x["sampled"] for x in layers_seen)
    assert len(set(registered)) == 3

    deployment.stop()
    assert len(tree) >= 4
    assert [pid for pid in tree if pid_running(pid)] == []


def _logs(dep: LocalDeployment) -> str:
    return "\n".join(
        f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted((dep.workdir / "logs").glob("*.log"))
    )
