"""Loading policies from YAML and TOML: located, typed, several-at-once errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from policy_helpers import EXAMPLES

from layerfed.governance.errors import PolicyError, PolicyLoadError, PolicySemanticError
from layerfed.governance.loader import check_policy_file, load_policy, parse_policy_text
from layerfed.governance.schema import Policy

HEAD = """\
format_version: 1
name: t
version: 1
expires: 2030-01-01T00:00:00Z
"""
LAYER = """\
layers:
  - name: creator
    server_lr: 1.0
    scope:
      include: ["transformer.h.*.mlp.c_fc.weight"]
"""

# (document, line, column, field path, fragment of the message)
BROKEN_YAML = [
    (HEAD.replace("\nversion: 1\n", "\nversion: 0\n") + LAYER, 3, 10, "version", ">= 1, got 0"),
    (HEAD + LAYER.replace("1.0", "1.5"), 7, 16, "layers[0].server_lr", "<= 1.0, got 1.5"),
    (HEAD + LAYER.replace("1.0", "fast"), 7, 16, "layers[0].server_lr", "a number, got 'fast'"),
    (
        HEAD + LAYER + "    server_rate: 2\n",
        10,
        5,
        "layers[0].server_rate",
        "did you mean 'server_lr'?",
    ),
    (
        HEAD + LAYER.replace("    server_lr: 1.0\n", ""),
        6,
        5,
        "layers[0].server_lr",
        "field 'server_lr'",
    ),
    (
        HEAD + LAYER.replace("name: creator", "name: custom"),
        6,
        5,
        "layers[0].rank",
        "required for layers not named",
    ),
    (
        HEAD + LAYER + "    memories: [{name: a, half_life: 6x}]\n",
        10,
        37,
        "layers[0].memories[0].half_life",
        "a duration like",
    ),
    (
        HEAD.replace("2030-01-01T00:00:00Z", "2030-01-01T00:00:00") + LAYER,
        4,
        10,
        "expires",
        "time zone",
    ),
    (
        HEAD
        + LAYER
        + "vetoes:\n  - {name: v, holder: creator, applies_to: [x], condition: {kind: bogus}, action: reject}\n",
        11,
        67,
        "vetoes[0].condition.kind",
        "a 'kind' of",
    ),
    (
        HEAD + LAYER + "    aggregator: {kind: mean}\n",
        10,
        24,
        "layers[0].aggregator.kind",
        "one of",
    ),
    (
        HEAD + LAYER + "    local: {lr: 0.1, steps: 0}\n",
        10,
        29,
        "layers[0].local.steps",
        ">= 1, got 0",
    ),
    (HEAD + "layers: []\n", 5, 9, "layers", "at least 1 item"),
    (
        HEAD + LAYER + "base_model: {builtin: tiny, path: /x}\n",
        10,
        13,
        "base_model",
        "exactly one of 'builtin' or 'path'",
    ),
    (
        HEAD + LAYER + "principals:\n  - {name: p, layer: creator, public_key: abc}\n",
        11,
        43,
        "principals[0].public_key",
        "a string matching",
    ),
]


@pytest.mark.parametrize(("text", "line", "col", "field", "fragment"), BROKEN_YAML)
def test_broken_yaml_reports_exact_position_and_field(
    tmp_path: Path, text: str, line: int, col: int, field: str, fragment: str
) -> None:
    """Each broken document yields an error at the exact line, column and field path."""
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    result = check_policy_file(path)
    assert not result.ok
    rendered = [str(d) for d in result.diagnostics]
    match = [d for d in result.diagnostics if d.path == field]
    assert match, rendered
    assert (match[0].line, match[0].column) == (line, col), rendered
    assert fragment in match[0].message, rendered
    assert str(match[0]).startswith(f"{path}:{line}:{col}: error: {field}: expected ")


BROKEN_TOML = [
    ('format_version = 1\nname = "t"\nversion = 0\n', 3, 11, "version"),
    (
        'format_version = 1\nname = "t"\nversion = 1\nexpires = 2030-01-01T00:00:00Z\n'
        '[[layers]]\nname = "creator"\nserver_lr = 3.0\nscope = { include = ["a.b"] }\n',
        7,
        13,
        "layers[0].server_lr",
    ),
    (
        'format_version = 1\nname = "t"\nversion = 1\nexpires = 2030-01-01T00:00:00Z\n'
        '[[layers]]\nname = "creator"\nserver_lr = 1.0\nscope = { include = ["a.b"] }\n'
        '[[layers]]\nname = "government"\nserver_lr = 1.0\n'
        'scope = { include = ["a.c"], lora_rank = 0 }\n',
        12,
        42,
        "layers[1].scope.lora_rank",
    ),
    ('name = "t"\nversion = 1\nexpires = x\n', 3, 11, ""),
]


@pytest.mark.parametrize(("text", "line", "col", "field"), BROKEN_TOML)
def test_broken_toml_reports_exact_position_and_field(
    tmp_path: Path, text: str, line: int, col: int, field: str
) -> None:
    """TOML errors carry the same file:line:col and field path as YAML errors."""
    path = tmp_path / "p.toml"
    path.write_text(text, encoding="utf-8")
    result = check_policy_file(path)
    rendered = [str(d) for d in result.diagnostics]
    match = [d for d in result.diagnostics if d.path == field]
    assert match, rendered
    assert (match[0].line, match[0].column) == (line, col), rendered


def test_several_errors_reported_at_once(tmp_path: Path) -> None:
    """One pass reports every schema error, not just the first."""
    text = HEAD.replace("\nversion: 1\n", "\nversion: -1\n") + LAYER.replace("1.0", "7")
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    paths = {d.path for d in check_policy_file(path).diagnostics}
    assert {"version", "layers[0].server_lr"} <= paths


def test_yaml_and_toml_examples_mean_the_same() -> None:
    """default.yaml and default.toml parse to the same policy."""
    assert load_policy(EXAMPLES / "default.yaml") == load_policy(EXAMPLES / "default.toml")


@pytest.mark.parametrize(
    "name", sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in (".yaml", ".toml"))
)
def test_every_shipped_example_is_valid(name: str) -> None:
    """Every example policy loads without errors."""
    assert isinstance(load_policy(EXAMPLES / name), Policy)


def test_individual_defaults_to_stm_and_ltm() -> None:
    """A layer named individual gets stm + ltm memories and stays on the instance by default."""
    policy = parse_policy_text(
        HEAD + "layers:\n  - {name: individual, server_lr: 1, scope: {include: ['a.b']}}\n"
    )
    layer = policy.layer("individual")
    assert [m.name for m in layer.memories] == ["stm", "ltm"]
    assert layer.slot_key == "instance" and layer.updates_leave_instance is False


def test_missing_file_is_a_typed_error(tmp_path: Path) -> None:
    """A missing file raises PolicyLoadError naming the file."""
    with pytest.raises(PolicyLoadError) as info:
        load_policy(tmp_path / "nope.yaml")
    assert "nope.yaml:1:1: error" in str(info.value)


def test_unknown_extension_is_refused(tmp_path: Path) -> None:
    """Only .yaml, .yml and .toml are accepted."""
    path = tmp_path / "p.json"
    path.write_text("{}", encoding="utf-8")
    with pytest.raises(
        PolicyLoadError, match=r"expected a \.yaml, \.yml or \.toml file, got \.json"
    ):
        load_policy(path)


def test_invalid_utf8_names_line_and_column(tmp_path: Path) -> None:
    """A bad byte is located by line and column."""
    path = tmp_path / "p.yaml"
    path.write_bytes(b"name: t\nversion: \xff\n")
    with pytest.raises(PolicyLoadError, match=r"p.yaml:2:10: error: .*byte 0xff"):
        load_policy(path)


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    """Duplicate keys are reported at the second occurrence, not silently overwritten."""
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + "name: again\n" + LAYER, encoding="utf-8")
    with pytest.raises(PolicyLoadError, match=r"p.yaml:5:1: error: .*duplicate key 'name'"):
        load_policy(path)


def test_yaml_alias_bomb_is_refused(tmp_path: Path) -> None:
    """Exponential alias expansion stops with a typed error."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = tmp_path / "p.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(PolicyLoadError, match="too large"):
        load_policy(path)


def test_semantic_error_is_its_own_type(tmp_path: Path) -> None:
    """A well-formed but inconsistent policy raises PolicySemanticError (a PolicyError)."""
    path = tmp_path / "p.yaml"
    path.write_text(HEAD.replace("2030", "2001") + LAYER, encoding="utf-8")
    with pytest.raises(PolicySemanticError) as info:
        load_policy(path)
    assert isinstance(info.value, PolicyError)
    assert info.value.diagnostics[0].path == "expires"
