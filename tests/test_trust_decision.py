"""One trust decision (governance/trust.py) for the server, the node and `policy verify`.

The CLI used to trust an unsigned ``--trusted PREV`` naming an attacker's key while the
run path refused it; now all three ask the same decision with the same inputs.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from deploy_helpers import write_public_key
from typer.testing import CliRunner

from layerfed.cli import app
from layerfed.clients.config import ConfigError, InstanceConfig, verified_instance_policy
from layerfed.errors import LayerfedError
from layerfed.federation.run_config import RunConfigError, RunSettings
from layerfed.federation.server_app import verified_policy
from layerfed.governance.canonical import policy_hash
from layerfed.governance.keys import public_key_string
from layerfed.governance.signing import PolicyTrustError, sign_policy_file
from layerfed.governance.trust import (
    DEPLOYMENT,
    RESEARCH,
    TrustRequest,
    TrustSetting,
    TrustSetupError,
    decide_trust,
    verify_trust,
)
from layerfed.simulation.settings import DEFAULT_POLICY, DEFAULT_ROOT_KEY

DEMO_KEY = "ed25519:2OrEWzArwiwLQ4yrOatANcwIQ/HZLPg2h6RER+JsxSM="
"""The demo root's public key as default.yaml names it (the policy signer)."""


def policy_file(
    tmp: Path, name: str, version: int, owner: Ed25519PrivateKey, signer: Ed25519PrivateKey | None
) -> Path:
    """default.yaml at ``version`` whose policy signer is ``owner``, signed by ``signer``."""
    text = DEFAULT_POLICY.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^version: 1$", f"version: {version}", text)
    text = text.replace(DEMO_KEY, public_key_string(owner.public_key()))
    path = tmp / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    if signer is not None:
        sign_policy_file(path, signer)
    return path


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Any]:
    """Own root key, a signed v1 and v2, and the attack: an unsigned PREV naming the
    attacker's key and the attacker's policy signed by it."""
    root, attacker = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    return {
        "root": write_public_key(root, tmp_path / "root.pub.pem"),
        "v1": policy_file(tmp_path, "v1", 1, root, root),
        "v2": policy_file(tmp_path, "v2", 2, root, root),
        "prev": policy_file(tmp_path, "prev", 1, attacker, None),
        "evil": policy_file(tmp_path, "evil", 2, attacker, attacker),
    }


def test_cli_refuses_unsigned_trusted_previous_naming_an_attacker(world: dict[str, Any]) -> None:
    """`policy verify EVIL --trusted PREV` with PREV unsigned exits 1 naming --root-key; with
    --root-key it exits 1 naming PREV (it must itself verify), as the run path refuses."""
    runner = CliRunner()
    bare = runner.invoke(
        app, ["policy", "verify", str(world["evil"]), "--trusted", str(world["prev"])]
    )
    assert bare.exit_code == 1, bare.output
    assert "no_root" in bare.output and "--root-key" in bare.output and "trusted" not in bare.stdout
    rooted = runner.invoke(
        app,
        [
            "policy",
            "verify",
            str(world["evil"]),
            "--trusted",
            str(world["prev"]),
            "--root-key",
            str(world["root"]),
        ],
    )
    assert rooted.exit_code == 1, rooted.output
    assert str(world["prev"]) in rooted.output and "not trusted" in rooted.output


def test_cli_accepts_a_successor_of_a_verified_previous_policy(world: dict[str, Any]) -> None:
    """`policy verify V2 --trusted V1 --root-key ROOT` exits 0: V1 verifies, then vouches for V2."""
    args = ["policy", "verify", str(world["v2"]), "--trusted", str(world["v1"])]
    result = CliRunner().invoke(app, [*args, "--root-key", str(world["root"])])
    assert result.exit_code == 0 and "trusted: default version 2" in " ".join(result.output.split())


def _server(world: dict[str, Any], case: dict[str, Any]) -> tuple[bool, str]:
    settings = RunSettings(
        policy=str(world[case["policy"]]),
        root_key=str(case["root"]) if case.get("root") else "",
        trusted=str(world[case["trusted"]]) if case.get("trusted") else "",
        verify=case.get("verify", True),
    )
    try:
        return True, policy_hash(verified_policy(settings))
    except RunConfigError as e:
        assert isinstance(e.__cause__, TrustSetupError)
        return False, e.__cause__.reason
    except PolicyTrustError as e:
        return False, e.reason


def _node(world: dict[str, Any], case: dict[str, Any]) -> tuple[bool, str]:
    data: dict[str, Any] = {"instance": {"id": "a"}, "policy": str(world[case["policy"]])}
    if case.get("root"):
        data["root_key"] = str(case["root"])
    if case.get("trusted"):
        data["trusted"] = str(world[case["trusted"]])
    data["verify"] = case.get("verify", True)
    config = InstanceConfig.parse(data, where="test", root=Path("/"))
    try:
        return True, policy_hash(verified_instance_policy(config, deployed=True))
    except ConfigError as e:
        assert isinstance(e.__cause__, TrustSetupError)
        return False, e.__cause__.reason
    except PolicyTrustError as e:
        return False, e.reason


CASES = {
    "root signs v1": ({"policy": "v1", "root": "own"}, (True, None)),
    "v1 vouches for v2": ({"policy": "v2", "root": "own", "trusted": "v1"}, (True, None)),
    "no root": ({"policy": "v1"}, (False, "no_root")),
    "trusted without root": ({"policy": "v2", "trusted": "v1"}, (False, "no_root")),
    "unsigned prev": ({"policy": "evil", "root": "own", "trusted": "prev"}, (False, "unreadable")),
    "demo root": ({"policy": "v1", "root": DEFAULT_ROOT_KEY}, (False, "demo_root")),
    "unverified": ({"policy": "v1", "root": "own", "verify": False}, (False, "unverified")),
    "rollback": ({"policy": "v1", "root": "own", "trusted": "v2"}, (False, "rollback")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_server_and_node_reach_the_same_decision(world: dict[str, Any], name: str) -> None:
    """The deployed server and a deployed node, given the same inputs, trust the same policy
    (same hash) or refuse with the same reason code."""
    case, (ok, reason) = CASES[name]
    case = {**case, "root": world["root"] if case.get("root") == "own" else case.get("root")}
    server, node = _server(world, case), _node(world, case)
    assert server == node
    assert server[0] is ok and (ok or server[1] == reason)


def test_decide_trust_never_raises_and_names_the_setting(tmp_path: Path) -> None:
    """decide_trust returns a refusal naming root_key for a missing root (verify_trust raises
    the same as TrustSetupError), and a malformed result for an unreadable key file."""
    request = TrustRequest(policy=DEFAULT_POLICY)
    decision = decide_trust(request)
    assert not decision.ok and decision.reason == "no_root"
    assert decision.setting is TrustSetting.ROOT_KEY
    with pytest.raises(TrustSetupError) as caught:
        verify_trust(request)
    assert caught.value.setting is TrustSetting.ROOT_KEY
    missing = decide_trust(TrustRequest(policy=DEFAULT_POLICY, root_keys=(tmp_path / "no.pem",)))
    assert not missing.ok and isinstance(missing.error, LayerfedError)


def test_research_rules_allow_demo_root_and_unverified_only_when_asked() -> None:
    """RESEARCH trusts the demo-root-signed default policy and an unverified read;
    DEPLOYMENT refuses both with demo_root / unverified."""
    demo = TrustRequest(policy=DEFAULT_POLICY, root_keys=(DEFAULT_ROOT_KEY,))
    assert decide_trust(demo).reason == "demo_root"
    research = TrustRequest(policy=DEFAULT_POLICY, root_keys=(DEFAULT_ROOT_KEY,), rules=RESEARCH)
    assert decide_trust(research).ok
    unverified = TrustRequest(policy=DEFAULT_POLICY, verify=False, rules=DEPLOYMENT)
    assert decide_trust(unverified).reason == "unverified"
    assert decide_trust(TrustRequest(policy=DEFAULT_POLICY, verify=False, rules=RESEARCH)).ok


def test_expired_trusted_anchor_is_tolerated_but_not_an_expired_policy(
    world: dict[str, Any],
) -> None:
    """A --trusted policy that has expired still vouches for its successor (it is often the
    one replaced); the policy itself must not have expired at ``now``."""
    request = TrustRequest(policy=world["v2"], root_keys=(world["root"],), trusted=world["v1"])
    assert verify_trust(request).version == 2
    late = decide_trust(request, now=datetime(9999, 1, 1, tzinfo=UTC))
    assert late.reason == "expired" and late.detail.startswith(f"{world['v2']}:")


@pytest.mark.parametrize("value", [True, False])
def test_retired_simulation_key_is_refused_in_a_run_config(value: bool) -> None:
    """An old run config naming layerfed-simulation (true or false) is refused naming the key:
    nothing in a run config relaxes a deployed server's trust."""
    with pytest.raises(RunConfigError, match="layerfed-simulation: expected no such key"):
        RunSettings.from_config({"layerfed-policy": "p.yaml", "layerfed-simulation": value})
