"""A layer scope that matches no weight of the model is an error at server start (issue 13).

The server resolves every layer's scope on the base model before it writes
anything or starts the strategy, and refuses with a typed :class:`ScopeError`
naming the layer and its patterns; ``layerfed policy check --model`` reports the
same policy as an error (exit 1), not a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from deploy_helpers import write_private_key, write_public_key
from flwr.app import Context
from flwr.serverapp import Grid
from policy_helpers import default_data, write_yaml
from typer.testing import CliRunner

from layerfed.cli import app
from layerfed.errors import LayerfedError
from layerfed.federation.run_config import RunSettings
from layerfed.federation.server_app import run_server
from layerfed.governance.keys import public_key_string
from layerfed.governance.schema import Policy
from layerfed.governance.signing import sign_policy_file
from layerfed.layers.base import load_base
from layerfed.layers.errors import ScopeError
from layerfed.layers.slots import check_scopes

DEMO_KEY = "ed25519:2OrEWzArwiwLQ4yrOatANcwIQ/HZLPg2h6RER+JsxSM="
"""creator_root's key in default.yaml (the policy signer), replaced by the test's own root."""
NOWHERE = "transformer.h.*.mlp.c_nowhere.weight"


def _nowhere(data: dict[str, Any], layer: int = 2) -> dict[str, Any]:
    data["layers"][layer]["scope"]["include"] = [NOWHERE]
    return data


def test_check_scopes_names_the_layer_and_its_patterns() -> None:
    """check_scopes raises a typed ScopeError for the community layer whose scope matches nothing."""
    model, _ = load_base(Policy.model_validate(default_data()).base_model)
    check_scopes(Policy.model_validate(default_data()), model)  # the default policy resolves
    with pytest.raises(ScopeError) as caught:
        check_scopes(Policy.model_validate(_nowhere(default_data())), model)
    assert isinstance(caught.value, LayerfedError)
    assert "layer 'community' scope" in str(caught.value) and NOWHERE in str(caught.value)


def _deployment(tmp: Path, data: dict[str, Any]) -> RunSettings:
    """Signed deployment settings (own root and server keys) for ``data``, one round."""
    root = Ed25519PrivateKey.generate()
    root_pub = write_public_key(root, tmp / "keys" / "root.pub.pem")
    server = write_private_key(Ed25519PrivateKey.generate(), tmp / "keys" / "server.pem")
    text = yaml.safe_dump(data, sort_keys=False).replace(
        DEMO_KEY, public_key_string(root.public_key())
    )
    policy = tmp / "policy.yaml"
    policy.write_text(text, encoding="utf-8")
    sign_policy_file(policy, root)
    return RunSettings(
        policy=str(policy),
        root_key=str(root_pub),
        server_key=str(server),
        out=str(tmp / "out"),
        rounds=1,
        run_id="deploy-1",
    )


def test_run_server_refuses_a_scope_matching_nothing_before_round_1(tmp_path: Path) -> None:
    """run_server raises the ScopeError before it writes the run folder or touches the grid.

    The grid is None: had the strategy started, it would fail with something else.
    """
    settings = _deployment(tmp_path, _nowhere(default_data()))
    with pytest.raises(ScopeError, match=r"layer 'community' scope.*c_nowhere"):
        run_server(cast(Grid, None), cast(Context, None), settings)
    assert not (tmp_path / "out").exists()


def test_policy_check_with_model_reports_an_empty_scope_as_an_error(tmp_path: Path) -> None:
    """`policy check --model builtin:tiny` exits 1 naming the layer and its patterns."""
    path = write_yaml(tmp_path, _nowhere(default_data()))
    result = CliRunner().invoke(app, ["policy", "check", str(path), "--model", "builtin:tiny"])
    assert result.exit_code == 1, result.output
    flat = " ".join(result.output.split())
    assert "layers[2].scope" in flat and "layer 'community'" in flat and NOWHERE in flat
    assert "Traceback" not in result.output
    ok = CliRunner().invoke(
        app,
        [
            "policy",
            "check",
            str(write_yaml(tmp_path, default_data(), "ok.yaml")),
            "--model",
            "builtin:tiny",
        ],
    )
    assert ok.exit_code == 0, ok.output
