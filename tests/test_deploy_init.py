"""`layerfed deploy init`: every file a local deployment needs, with its own keys, from nothing.

Fast checks of what init writes (signed policy with real keys, certificates, instance
configs trusting the server key, TLS and SuperNode keys, run config, run.sh) and of the
run-config overrides `deploy up` passes to `flwr run`. The real processes run in
tests/test_deploy_e2e.py.
"""

from __future__ import annotations

import base64
import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from deploy_helpers import make_llama
from flwr.common.config import parse_config_args
from typer.testing import CliRunner

from layerfed.cli import app
from layerfed.clients.config import InstanceConfig, load_certificates, verified_instance_policy
from layerfed.deploy import (
    DeployError,
    InitOptions,
    Layout,
    init_deployment,
    merged_run_config,
    run_config_string,
)
from layerfed.deploy.cli import parse_overrides
from layerfed.federation.run_config import RunSettings
from layerfed.governance.keys import load_private_key, load_public_key, public_key_string
from layerfed.governance.patterns import matches
from layerfed.layers.params import read_model_params

ROOT = Path(__file__).resolve().parents[1]
_KEY = re.compile(r"ed25519:[A-Za-z0-9+/]{43}=")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder (not GPT-2) with a word-level tokenizer."""
    return make_llama(tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="module")
def layout(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """`layerfed deploy init DIR --model PATH --instances 3`, run through the CLI."""
    folder = tmp_path_factory.mktemp("deploy") / "dep"
    result = CliRunner().invoke(
        app, ["deploy", "init", str(folder), "--model", str(model), "--instances", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "run.sh" in result.output
    return Layout.load(folder)


def _example_keys() -> set[str]:
    """Every ed25519 key written anywhere in examples/ (placeholders and demo keys)."""
    found: set[str] = set()
    for path in (ROOT / "examples").rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".toml", ".json", ".pub", ".md"}:
            found |= set(_KEY.findall(path.read_text(encoding="utf-8", errors="replace")))
    return found


def test_policy_is_signed_by_its_own_root_and_names_its_own_keys(layout: Layout) -> None:
    """The policy verifies against keys/root.pub.pem as a deployed node checks it, and
    every principal is a key init wrote; no example or placeholder key is left."""
    config = InstanceConfig.load(layout.seats[0].config)
    policy = verified_instance_policy(config, deployed=True)
    keys = layout.folder / "keys"
    written = {
        public_key_string(load_public_key(p))
        for p in keys.glob("*.pub.pem")
        if p.stem != "server.pub"
    }
    assert {p.public_key for p in policy.principals} == written
    text = layout.policy.read_text(encoding="utf-8")
    assert not (set(_KEY.findall(text)) & _example_keys())
    assert policy.base_model.path == "model"
    assert (layout.folder / "model").is_symlink()


def test_scopes_and_red_lines_name_the_llamas_own_parameters(layout: Layout, model: Path) -> None:
    """Each layer's scope matches weights of the Llama; every red-line glob matches one."""
    policy = verified_instance_policy(InstanceConfig.load(layout.seats[0].config))
    names = read_model_params(str(model)).names
    for layer in policy.layers:
        assert any(matches(n, p) for n in names for p in layer.scope.include), layer.name
    assert policy.red_lines.parameters
    for pattern in policy.red_lines.parameters:
        assert any(matches(n, pattern) for n in names), pattern


def test_instances_have_keys_certificates_and_sync(layout: Layout) -> None:
    """Each instance TOML loads: its layers alternate shared layer + individual, each layer
    has a certificate for its own key signed by that layer's delegating principal, and
    [sync] trusts the server key whose private half signs the run's checkpoints."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    assert [s.id for s in layout.seats] == ["instance-1", "instance-2", "instance-3"]
    assert [s.layers for s in layout.seats] == [
        ("creator", "individual"),
        ("community", "individual"),
        ("creator", "individual"),
    ]
    server_pub = public_key_string(load_private_key(layout.folder / "keys/server.pem").public_key())
    for seat in layout.seats:
        config = InstanceConfig.load(seat.config)
        assert config.instance.id == seat.id and config.instance.layers == seat.layers
        assert config.server_key == layout.folder / "keys" / "server.pub.pem"
        assert public_key_string(load_public_key(config.server_key)) == server_pub
        assert config.sync_keep == 3
        policy = verified_instance_policy(config)
        assert config.key is not None
        own = public_key_string(load_private_key(config.key).public_key())
        certs = load_certificates(config.certificates)
        assert set(certs) == set(seat.layers)
        for layer, cert in certs.items():
            issuer = next(p for p in policy.principals if p.name == cert.issuer)
            assert issuer.layer == layer and issuer.delegates_to_instances
            assert cert.instance_id == seat.id and cert.public_key == own
            raw = base64.b64decode(issuer.public_key.removeprefix("ed25519:"))
            Ed25519PublicKey.from_public_bytes(raw).verify(
                base64.b64decode(cert.signature), cert.payload()
            )
        assert seat.node_key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        assert seat.node_public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert oct(seat.node_key.stat().st_mode & 0o777) == "0o600"
    assert oct((layout.folder / "keys/root.pem").stat().st_mode & 0o777) == "0o600"
    assert layout.tls.ca_cert.is_file() and layout.tls.server_key.is_file()


def test_run_config_and_script(layout: Layout) -> None:
    """run-config.toml reads as RunSettings with the folder's policy and keys; run.sh is
    executable and runs `deploy up` on its own folder."""
    config = tomllib.loads(layout.run_config.read_text(encoding="utf-8"))
    settings = RunSettings.from_config(config)
    assert (settings.policy, settings.root_key, settings.server_key) == (
        "policy.yaml",
        "keys/root.pub.pem",
        "keys/server.pem",
    )
    assert settings.rounds == 2 and settings.out == "out"
    script = layout.folder / "run.sh"
    assert os.access(script, os.X_OK)
    assert "deploy up ." in script.read_text() and 'cd "$(dirname "$0")"' in script.read_text()


def test_builtin_tiny_gets_gpt2_scopes(tmp_path: Path) -> None:
    """`--model builtin:tiny` writes a policy on the built-in model's GPT-2 names (no link)."""
    layout = init_deployment(tmp_path / "tiny", InitOptions("builtin:tiny", instances=1))
    data = yaml.safe_load(layout.policy.read_text(encoding="utf-8"))
    assert data["base_model"] == {"builtin": "tiny"}
    assert not (layout.folder / "model").exists()
    policy = verified_instance_policy(InstanceConfig.load(layout.seats[0].config))
    assert all(
        p.startswith("transformer.h.") for layer in policy.layers for p in layer.scope.include
    )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (InitOptions("builtin:tiny", instances=0), "--instances"),
        (InitOptions("builtin:tiny", layers=("creator", "king")), "--layers"),
        (InitOptions("/nonexistent/model"), "--model"),
    ],
)
def test_init_refuses_bad_options(tmp_path: Path, options: InitOptions, match: str) -> None:
    """A bad option is a DeployError naming it, and nothing is written."""
    with pytest.raises(DeployError, match=match):
        init_deployment(tmp_path / "x", options)
    assert not (tmp_path / "x" / "keys").exists()


def test_init_never_writes_into_a_used_folder(layout: Layout) -> None:
    """A folder with files (an earlier deployment's keys) is refused, not overwritten."""
    before = (layout.folder / "keys" / "root.pem").read_bytes()
    with pytest.raises(DeployError, match="empty folder"):
        init_deployment(layout.folder, InitOptions("builtin:tiny"))
    assert (layout.folder / "keys" / "root.pem").read_bytes() == before


def test_overrides_merge_into_one_run_config_flower_reads(layout: Layout) -> None:
    """`--set` pairs merge over run-config.toml into one key=value string that Flower parses
    back to the merged config (Flower itself refuses a TOML file beside key=value pairs)."""
    overrides = parse_overrides(["layerfed-rounds=3", "layerfed-out='runs/second'"])
    assert overrides == {"layerfed-rounds": 3, "layerfed-out": "runs/second"}
    merged = merged_run_config(layout.run_config, overrides)
    assert merged["layerfed-rounds"] == 3 and merged["layerfed-policy"] == "policy.yaml"
    assert parse_config_args([run_config_string(merged)]) == merged
    with pytest.raises(ValueError, match="TOML files cannot be passed alongside"):
        parse_config_args(["layerfed-rounds=3", str(layout.run_config)])
    for bad in ("layerfed-rounds", "layerfed-out=runs/x y", "=3"):
        with pytest.raises(DeployError, match="--set"):
            parse_overrides([bad])
    with pytest.raises(DeployError, match="run-config keys"):
        merged_run_config(layout.run_config, {"layerfed-scenario": "x"})
