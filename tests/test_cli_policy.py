"""`layerfed policy check|explain|diff|schema` as a policy writer uses them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from policy_helpers import EXAMPLES, default_data, write_yaml
from typer.testing import CliRunner

from layerfed.cli import app

runner = CliRunner()


def test_check_ok_exits_zero() -> None:
    """A valid policy passes `policy check` with exit code 0."""
    result = runner.invoke(app, ["policy", "check", str(EXAMPLES / "default.yaml")])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


def test_check_bad_policy_exits_one_with_located_errors(tmp_path: Path) -> None:
    """A broken policy exits 1 and prints FILE:LINE:COL errors, never a traceback."""
    data = default_data()
    data["layers"][0]["server_lr"] = 2
    path = write_yaml(tmp_path, data)
    result = runner.invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 1
    assert (
        f"{path}:" in result.output
        and "layers[0].server_lr: expected a number <= 1" in result.output
    )
    assert "Traceback" not in result.output


def test_check_garbage_bytes_exit_one(tmp_path: Path) -> None:
    """Binary garbage is an ordinary error, exit 1."""
    path = tmp_path / "p.yaml"
    path.write_bytes(b"\x00\x01: [\xff")
    result = runner.invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_check_with_model_reports_patterns_matching_nothing(tmp_path: Path) -> None:
    """--model tiny warns about scope patterns that match no parameter of the model."""
    data = default_data()
    data["layers"][1]["scope"]["include"].append("transformer.h.9.mlp.c_fc.weight")
    path = write_yaml(tmp_path, data)
    result = runner.invoke(app, ["policy", "check", str(path), "--model", "tiny"])
    assert result.exit_code == 0, result.output
    assert "layers[1].scope.include[1]" in result.output and "matching none" in result.output


def test_explain_is_the_same_for_yaml_and_toml() -> None:
    """`explain` prints the same text for the YAML and TOML editions of the default policy."""
    a = runner.invoke(app, ["policy", "explain", str(EXAMPLES / "default.yaml")])
    b = runner.invoke(app, ["policy", "explain", str(EXAMPLES / "default.toml")])
    assert a.exit_code == b.exit_code == 0
    assert a.output == b.output
    for needle in (
        "layer individual",
        "stm: rate x1, half-life 3 rounds",
        "red lines",
        "vetoed by",
    ):
        assert needle in a.output


def test_diff_flags_loosened_red_lines_and_vetoes(tmp_path: Path) -> None:
    """`diff` lists changes by layer and flags loosening; --fail-on-loosen exits 2."""
    old = write_yaml(tmp_path, default_data(), "old.yaml")
    data = default_data()
    data["version"] = 2
    data["red_lines"]["parameters"].remove("lm_head.weight")
    data["vetoes"][0]["action"] = "hold"
    data["layers"][4]["server_lr"] = 0.5
    new = write_yaml(tmp_path, data, "new.yaml")
    args = ["policy", "diff", str(old), str(new), "--patterns-only"]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "compared scope and red-line patterns only" in result.output
    assert "red-line parameters removed: ['lm_head.weight']" in result.output
    assert "veto action weakened from reject to hold" in result.output
    assert "layers.individual.server_lr" in result.output
    assert "4 change(s), 2 loosening governance" in result.output
    strict = runner.invoke(app, [*args, "--fail-on-loosen"])
    assert strict.exit_code == 2
    # On the policy's own model, lm_head.weight stays protected through its tie to wte.
    resolved = runner.invoke(app, args[:-1], terminal_width=200)
    assert resolved.exit_code == 0, resolved.output
    assert "compared the parameters each scope and red line matches on builtin:tiny" in (
        resolved.output
    )
    assert "red-line" not in resolved.output and "3 change(s), 1 loosening" in resolved.output


def test_schema_is_json_schema_that_accepts_the_default() -> None:
    """`schema` prints a JSON Schema that validates the default policy document."""
    result = runner.invoke(app, ["policy", "schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    jsonschema.validate(default_data(), schema)
    broken = default_data()
    broken["layers"][0]["unknown_field"] = 1
    try:
        jsonschema.validate(broken, schema)
    except jsonschema.ValidationError:
        return
    raise AssertionError("schema accepted an unknown field")


_QUICK = """
import sys
sys.argv = ["layerfed", *sys.argv[1:]]
from layerfed.cli import main
try:
    main()
except SystemExit as e:
    print("RC", e.code)
heavy = sorted(m for m in ("torch", "transformers", "peft", "flwr") if m in sys.modules)
print("HEAVY", ",".join(heavy) or "-")
"""


@pytest.mark.parametrize(
    "args",
    [
        ["policy", "check", "{bad}"],
        ["policy", "check", "{missing}"],
        ["simulate", "--policy", "{missing}", "--no-verify", "--out", "{out}"],
        ["policy", "test", "{missing}", "{missing}"],
    ],
    ids=["check-bad-path", "check-missing-key", "simulate-missing-key", "test-missing-key"],
)
def test_argument_and_config_errors_come_before_heavy_imports(
    tmp_path: Path, args: list[str]
) -> None:
    """A bad path or a policy missing a required key fails (exit 1) with torch/Flower unloaded."""
    missing = tmp_path / "missing.yaml"
    missing.write_text("format_version: 1\nversion: 1\n", encoding="utf-8")
    where = {"bad": str(tmp_path / "nope.yaml"), "missing": str(missing), "out": str(tmp_path)}
    argv = [a.format(**where) for a in args]
    done = subprocess.run(
        [sys.executable, "-c", _QUICK, *argv], capture_output=True, text=True, check=False
    )
    assert "RC 1" in done.stdout, done.stdout + done.stderr
    assert "HEAVY -" in done.stdout, done.stdout
    assert "nope.yaml" in done.stderr or "expected field 'name'" in done.stderr, done.stderr
