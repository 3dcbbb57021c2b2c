"""`layerfed policy test`: expected decisions of a policy, decided by the federation's code."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from policy_helpers import EXAMPLES, default_data, write_yaml
from typer.testing import CliRunner

from layerfed.cli import app
from layerfed.governance.keys import public_key_string
from layerfed.governance.policy_test_cases import (
    CaseFileError,
    case_file_schema,
    load_case_file,
)

runner = CliRunner()
TESTS = sorted((EXAMPLES / "tests").glob("*.*"))


def _policy_of(test_file: Path) -> Path:
    text = test_file.read_text(encoding="utf-8")
    import tomllib

    data = tomllib.loads(text) if test_file.suffix == ".toml" else yaml.safe_load(text)
    return (test_file.parent / data["policy"]).resolve()


@pytest.mark.parametrize("test_file", TESTS, ids=[t.name for t in TESTS])
def test_example_policies_pass_their_tests(test_file: Path) -> None:
    """Every shipped test file passes against the example policy it names (CI runs these)."""
    result = runner.invoke(app, ["policy", "test", str(_policy_of(test_file)), str(test_file)])
    assert result.exit_code == 0, result.output
    assert " 0 failed" in result.output


def test_every_example_policy_has_tests() -> None:
    """Each example policy with principals has a test file in examples/policies/tests/."""
    tested = {_policy_of(t).stem for t in TESTS}
    assert {"default", "strict-creator", "community-led"} <= tested


@pytest.mark.parametrize("test_file", TESTS, ids=[t.name for t in TESTS])
def test_example_test_files_follow_the_json_schema(test_file: Path) -> None:
    """The shipped test files validate against the published test-file JSON Schema."""
    import tomllib

    text = test_file.read_text(encoding="utf-8")
    data = tomllib.loads(text) if test_file.suffix == ".toml" else yaml.safe_load(text)
    jsonschema.validate(data, case_file_schema())


def _quorum_policy(tmp_path: Path) -> Path:
    """The default policy plus a delegating community principal and a creator quorum veto."""
    data: dict[str, Any] = default_data()
    key = public_key_string(Ed25519PrivateKey.generate().public_key())
    data["principals"].append(
        {
            "name": "community_ops",
            "layer": "community",
            "public_key": key,
            "delegates_to_instances": True,
        }
    )
    data["vetoes"].append(
        {
            "name": "creator_sign_off",
            "holder": "creator",
            "applies_to": ["community"],
            "condition": {"kind": "quorum", "min_signatures": 1},
            "action": "hold",
        }
    )
    return write_yaml(tmp_path, data)


def _cases(tmp_path: Path, cases: list[dict[str, Any]], name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"cases": cases}, sort_keys=False), encoding="utf-8")
    return path


COMMUNITY = {
    "layer": "community",
    "signer": "community_ops",
    "via_instance": True,
    "parameters": ["transformer.h.0.mlp.c_fc.weight"],
}


def test_held_for_approval_then_committed_with_the_approval(tmp_path: Path) -> None:
    """A quorum veto holds an unapproved update; the creator's approval lets it commit."""
    cases = [
        {
            "name": "held",
            "update": COMMUNITY,
            "expect": {"decision": "held", "reason": "creator_sign_off"},
        },
        {
            "name": "approved",
            "update": {**COMMUNITY, "approvals": ["creator_root"]},
            "expect": {"decision": "committed", "reason": "ok"},
        },
        {
            "name": "clipped by the government's norm veto",
            "update": {**COMMUNITY, "approvals": ["creator_root"], "norm": 50.0},
            "expect": {"decision": "committed", "reason": "clipped"},
        },
    ]
    path = _cases(tmp_path, cases)
    result = runner.invoke(app, ["policy", "test", str(_quorum_policy(tmp_path)), str(path)])
    assert result.exit_code == 0, result.output
    assert "3 passed, 0 failed" in result.output


def test_a_wrong_expectation_fails_with_line_expected_actual_and_trace(tmp_path: Path) -> None:
    """A failing case prints FILE:LINE, the expected and actual decision and the trace; exit 1."""
    cases = [
        {
            "name": "fine",
            "update": {**COMMUNITY, "approvals": ["creator_root"]},
            "expect": {"decision": "committed"},
        },
        {"name": "wrong", "update": COMMUNITY, "expect": {"decision": "committed"}},
    ]
    path = _cases(tmp_path, cases)
    result = runner.invoke(app, ["policy", "test", str(_quorum_policy(tmp_path)), str(path)])
    assert result.exit_code == 1, result.output
    out = result.output
    line = next(i + 1 for i, t in enumerate(path.read_text().splitlines()) if "name: wrong" in t)
    assert f"{path}:{line}: FAIL 'wrong'" in out
    assert "expected: committed" in out and "actual:   held (creator_sign_off)" in out
    assert "veto creator_sign_off (creator): approvals by 'creator'" in out
    assert "certified by 'community_ops' verified" in out
    assert "1 passed, 1 failed" in out


def test_junit_output_counts_failures(tmp_path: Path) -> None:
    """--format junit prints JUnit XML with one testcase per case and the failure's trace."""
    cases = [{"name": "wrong", "update": COMMUNITY, "expect": {"decision": "vetoed"}}]
    path = _cases(tmp_path, cases)
    args = ["policy", "test", str(_quorum_policy(tmp_path)), str(path), "--format", "junit"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    root = ET.fromstring(
        result.stdout.split("\n", 1)[1] if result.stdout.startswith("<?xml") else result.stdout
    )
    assert root.get("tests") == "1" and root.get("failures") == "1"
    failure = root.find("testsuite/testcase/failure")
    assert failure is not None and "expected vetoed, got held" in failure.get("message", "")


def test_a_malformed_test_file_names_file_line_and_field(tmp_path: Path) -> None:
    """A case without its expectation is an error naming file:line and the field."""
    path = tmp_path / "bad.yaml"
    text = "cases:\n  - name: x\n    update: {layer: creator, signer: a, parameters: [w]}\n"
    path.write_text(text, "utf-8")
    with pytest.raises(CaseFileError, match=r"bad.yaml:2:\d+: cases.0.expect: expected field"):
        load_case_file(path)
    result = runner.invoke(app, ["policy", "test", str(EXAMPLES / "default.yaml"), str(path)])
    assert result.exit_code == 1 and "cases.0.expect" in result.output


def test_an_update_needs_a_decision_and_a_composition_its_slots(tmp_path: Path) -> None:
    """A case is exactly one kind, with the expectation its kind needs."""
    path = _cases(
        tmp_path,
        [{"name": "x", "composition": {"instance": "i"}, "expect": {"decision": "committed"}}],
    )
    with pytest.raises(CaseFileError, match=r"expect\.slots"):
        load_case_file(path)
