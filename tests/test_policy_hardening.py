"""Hardened `policy check|sign|diff`: YAML 1.1/1.2 traps, key spellings, look-alikes, limits."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_helpers import default_data, write_yaml
from typer.testing import CliRunner

from layerfed.cli import app
from layerfed.governance.canonical import policy_bytes
from layerfed.governance.confusables import skeleton
from layerfed.governance.keys import generate_keypair, public_key_string
from layerfed.governance.loader import parse_policy_text
from layerfed.governance.yaml11 import ambiguous_scalars, yaml12_reading

runner = CliRunner()
SENTINEL = 987_654_321


def check(path: Path) -> tuple[int, str]:
    """Exit code and all output of `layerfed policy check PATH`."""
    result = runner.invoke(app, ["policy", "check", str(path)])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def write_with(tmp: Path, data: dict[str, Any], plain: str) -> tuple[Path, int, int]:
    """Write ``data`` as YAML with the sentinel replaced by the plain scalar ``plain``.

    Returns the path and the 1-based line and column where ``plain`` starts.
    """
    text = yaml.safe_dump(data, sort_keys=False).replace(str(SENTINEL), plain)
    path = tmp / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if line.endswith(f": {plain}"):
            return path, number, line.index(f": {plain}") + 3
    raise AssertionError("sentinel not written")


def write_utf8(tmp: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as YAML with non-ASCII characters as themselves (as a writer types them)."""
    path = tmp / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def key_text() -> str:
    """A fresh canonical ``ed25519:`` public key string."""
    return public_key_string(Ed25519PrivateKey.generate().public_key())


def other_spelling(key: str) -> str:
    """The same 32 key bytes, with the unused low bits of the last base64 digit set."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    body = key[len("ed25519:") : -1]
    last = alphabet.index(body[-1])
    twin = alphabet[(last & ~3) | (3 if last & 3 == 0 else 0)]
    spelt = "ed25519:" + body[:-1] + twin + "="
    assert spelt != key
    assert base64.b64decode(spelt[8:]) == base64.b64decode(key[8:])
    return spelt


# --------------------------------------------------------------------------- 1. YAML 1.1 vs 1.2


@pytest.mark.parametrize(
    ("plain", "field", "reading"),
    [
        ("010", "min_clients", "8 in YAML 1.1 but 10 in YAML 1.2"),
        ("+010", "min_clients", "8 in YAML 1.1 but 10 in YAML 1.2"),
        ("1:00", "min_clients", "60 in YAML 1.1 but the string '1:00' in YAML 1.2"),
        ("0b101", "min_clients", "5 in YAML 1.1 but the string '0b101' in YAML 1.2"),
        ("0o17", "min_clients", "the string '0o17' in YAML 1.1 but 15 in YAML 1.2"),
        ("1_000", "min_clients", "1000 in YAML 1.1 but the string '1_000' in YAML 1.2"),
        ("yes", "updates_leave_instance", "true in YAML 1.1 but the string 'yes'"),
        ("Off", "updates_leave_instance", "false in YAML 1.1 but the string 'Off'"),
        ("y", "updates_leave_instance", "true in YAML 1.1 but the string 'y'"),
        ("N", "updates_leave_instance", "false in YAML 1.1 but the string 'N'"),
    ],
)
def test_yaml_11_12_traps_refused_with_location(
    tmp_path: Path, plain: str, field: str, reading: str
) -> None:
    """A plain scalar read differently by YAML 1.1 and 1.2 fails `policy check` at FILE:LINE:COL,
    naming the field, both readings, and telling the writer to quote it."""
    data = default_data()
    data["layers"][2][field] = SENTINEL
    path, line, col = write_with(tmp_path, data, plain)
    code, output = check(path)
    assert code == 1, output
    assert f"{path}:{line}:{col}: error: layers[2].{field}: " in output
    assert reading in output and f"quote it ('{plain}')" in output


@pytest.mark.parametrize("plain", ["'010'", '"yes"', "10", "0x1F", "true", "1.5e-3", "!!str on"])
def test_unambiguous_scalars_are_not_flagged(plain: str) -> None:
    """Quoted scalars, explicit tags and values both YAML versions read alike are not traps."""
    assert ambiguous_scalars(f"a: {plain}\n") == []


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(10**9), max_value=10**9))
def test_plain_decimal_integers_are_never_traps(number: int) -> None:
    """Every integer as PyYAML writes it reads the same in YAML 1.1 and 1.2."""
    text = yaml.safe_dump({"a": number})
    assert ambiguous_scalars(text) == []
    assert yaml12_reading(str(number)) == yaml.safe_load(text)["a"]


# --------------------------------------------------------------------------- 2. keys as raw bytes


def test_one_key_spelt_two_ways_is_refused(tmp_path: Path) -> None:
    """Two principals holding one key in two base64 spellings break the unique-key rule, and the
    non-canonical spelling is itself an error naming its field."""
    data = default_data()
    key = key_text()
    data["principals"] += [
        {"name": "creator_a", "layer": "creator", "public_key": key},
        {"name": "creator_b", "layer": "creator", "public_key": other_spelling(key)},
    ]
    code, output = check(write_yaml(tmp_path, data))
    assert code == 1
    assert "principals[3].public_key: expected a key of its own, got the key of 'creator_a'" in (
        output
    )
    assert f"principals[3].public_key: expected the canonical base64 spelling '{key}'" in output


def test_non_canonical_key_alone_is_refused(tmp_path: Path) -> None:
    """A single non-canonical key spelling fails `policy check` (located, with the fix)."""
    data = default_data()
    key = key_text()
    data["principals"].append({"name": "creator_a", "layer": "creator"})
    data["principals"][-1]["public_key"] = other_spelling(key)
    code, output = check(write_yaml(tmp_path, data))
    assert code == 1 and f"expected the canonical base64 spelling '{key}'" in output


# --------------------------------------------------------------------------- 3. look-alikes


def test_cyrillic_red_line_pattern_is_an_error(tmp_path: Path) -> None:
    """A red-line pattern with a Cyrillic 'a' (U+0430) protects nothing: `policy check` refuses it,
    naming the character, what it imitates, the field and its line."""
    data = default_data()
    data["red_lines"]["parameters"] = ["tr\u0430nsformer.wte.weight"]  # Cyrillic \u0430
    path = write_utf8(tmp_path, data)
    code, output = check(path)
    assert code == 1
    line = (
        path.read_text(encoding="utf-8").splitlines().index("  - tr\u0430nsformer.wte.weight") + 1
    )
    assert f"{path}:{line}:5: error: red_lines.parameters[0]: " in output
    assert "U+0430 CYRILLIC SMALL LETTER A" in output and "looks like 'a'" in output


def test_lookalike_layer_name_is_named_once(tmp_path: Path) -> None:
    """A layer name with a Cyrillic 'i' (U+0456) is reported as a look-alike (not only a pattern miss)."""
    data = default_data()
    data["layers"][4]["name"] = "\u0456ndividual"  # Cyrillic \u0456
    code, output = check(write_utf8(tmp_path, data))
    assert code == 1
    assert "layers[4].name: expected an ASCII name" in output and "looks like 'i'" in output
    assert output.count("layers[4].name:") == 1


def test_lookalike_scope_exclude_and_invisible_characters(tmp_path: Path) -> None:
    """A look-alike in scope.exclude (which would exclude nothing) and a zero-width space in a
    red-line pattern are errors."""
    data = default_data()
    data["layers"][1]["scope"]["exclude"] = [
        "transformer.h.0.ml\u0440.c_fc.weight"
    ]  # Cyrillic \u0440
    data["red_lines"]["parameters"] = ["transformer.wte.weight\u200b"]
    code, output = check(write_utf8(tmp_path, data))
    assert code == 1
    assert "layers[1].scope.exclude[0]:" in output and "looks like 'p'" in output
    assert "red_lines.parameters[0]:" in output and "invisible U+200B ZERO WIDTH SPACE" in output


def test_mixed_script_slot_key_refused_single_script_allowed(tmp_path: Path) -> None:
    """A slot key mixing Latin and Cyrillic is refused; one wholly in Cyrillic is fine."""
    data = default_data()
    data["principals"][1]["slots"] = ["\u0435u"]  # Cyrillic \u0435 + Latin u
    code, output = check(write_utf8(tmp_path, data))
    assert code == 1 and "principals[1].slots[0]:" in output and "several scripts" in output
    data["principals"][1]["slots"] = ["\u0440\u0443"]
    code, output = check(write_utf8(tmp_path, data))
    assert code == 0, output


def test_skeleton_folds_lookalikes() -> None:
    """Look-alikes from Cyrillic, Greek and fullwidth forms fold to the ASCII they imitate."""
    assert skeleton("tr\u0430nsf\u043ermer") == "transformer"
    assert skeleton("\u0391\u0392\u0421") == "ABC"
    assert skeleton("\uff57\uff54\uff45") == "wte"


# --------------------------------------------------------------------------- 4. limits


def test_huge_per_round_budget_refused_unless_limits_raise_it(tmp_path: Path) -> None:
    """40,960,000 examples per client per round fail `policy check` with the field, value, limit
    and how to raise it; an explicit `limits:` block makes the same policy pass."""
    data = default_data()
    data["layers"][2]["local"] = {"lr": 0.001, "steps": 10_000, "batch_size": 4096}
    code, output = check(write_yaml(tmp_path, data))
    assert code == 1
    assert "layers[2].local.steps: expected local.steps x local.batch_size <= 100000" in output
    assert "10000 x 4096 = 40960000" in output
    assert "limits: {max_examples_per_round: 40960000}" in output
    data["limits"] = {"max_examples_per_round": 40_960_000}
    code, output = check(write_yaml(tmp_path, data))
    assert code == 0, output


def test_lora_rank_above_limit_refused_unless_raised(tmp_path: Path) -> None:
    """scope.lora_rank above 64 is an error until limits.max_lora_rank allows it."""
    data = default_data()
    data["layers"][0]["scope"]["lora_rank"] = 128
    code, output = check(write_yaml(tmp_path, data))
    assert code == 1 and "layers[0].scope.lora_rank: expected scope.lora_rank <= 64" in output
    assert "limits: {max_lora_rank: 128}" in output
    data["limits"] = {"max_lora_rank": 128}
    assert check(write_yaml(tmp_path, data))[0] == 0


def test_limits_are_signed_only_when_present() -> None:
    """A policy without `limits` has the same canonical bytes as before limits existed (old
    signatures hold); a `limits` block is covered by the signature."""
    data = default_data()
    plain = parse_policy_text(yaml.safe_dump(data))
    assert b'"limits"' not in policy_bytes(plain)
    data["limits"] = {"max_lora_rank": 128}
    raised = parse_policy_text(yaml.safe_dump(data))
    assert b'"limits":{"max_examples_per_round":100000,"max_lora_rank":128}' in policy_bytes(raised)


def test_diff_flags_raised_limits(tmp_path: Path) -> None:
    """Raising a limit (from the default) is a loosening that --fail-on-loosen fails on."""
    old = default_data()
    new = default_data()
    new["limits"] = {"max_lora_rank": 128}
    args = ["policy", "diff", str(write_yaml(tmp_path, old, "old.yaml"))]
    result = runner.invoke(
        app, [*args, str(write_yaml(tmp_path, new, "new.yaml")), "--fail-on-loosen"]
    )
    assert result.exit_code == 2 and "LOOSENED: limits.max_lora_rank raised" in result.output


# --------------------------------------------------------------------------- 5. sign


def test_sign_refuses_policy_without_signers(tmp_path: Path) -> None:
    """`policy sign` on a policy without policy_signers exits 2 with a clear message, writes no
    signature file and prints no traceback."""
    data = default_data()
    del data["policy_signers"]
    path = write_yaml(tmp_path, data)
    pair = generate_keypair("root", tmp_path / "keys")
    result = runner.invoke(app, ["policy", "sign", str(path), "--key", str(pair.private_path)])
    assert result.exit_code == 2, result.output
    assert "policy_signers" in result.output and "could ever verify" in result.output
    assert "Traceback" not in result.output
    assert not path.with_name(path.name + ".sig.json").exists()


# --------------------------------------------------------------------------- 6. diff: new layer rank


def _council(rank: int) -> dict[str, Any]:
    return {
        "name": "council",
        "rank": rank,
        "slot_key": "global",
        "server_lr": 0.5,
        "scope": {"include": ["transformer.h.0.mlp.c_fc.weight"]},
        "memories": [{"name": "main"}],
    }


def test_diff_flags_new_layer_outranking_existing_ones(tmp_path: Path) -> None:
    """A new layer ranked above existing layers is a loosening; --fail-on-loosen exits 2."""
    old = default_data()
    new = default_data()
    new["layers"].append(_council(90))
    args = ["policy", "diff", str(write_yaml(tmp_path, old, "old.yaml"))]
    new_path = str(write_yaml(tmp_path, new, "new.yaml"))
    result = runner.invoke(app, [*args, new_path, "--fail-on-loosen"])
    assert result.exit_code == 2, result.output
    assert "LOOSENED: new layer 'council' (rank 90) outranks existing layer(s)" in result.output
    assert "'government'" in result.output and "'creator'" not in result.output.split("LOOSENED")[1]


def test_diff_new_layer_below_all_is_not_a_loosening(tmp_path: Path) -> None:
    """A new layer ranked below every existing layer is shown but not flagged."""
    old = default_data()
    new = default_data()
    new["layers"].append(_council(5))
    args = ["policy", "diff", str(write_yaml(tmp_path, old, "old.yaml"))]
    result = runner.invoke(
        app, [*args, str(write_yaml(tmp_path, new, "new.yaml")), "--fail-on-loosen"]
    )
    assert result.exit_code == 0, result.output
    assert "layers.council" in result.output and "LOOSENED" not in result.output


def test_diff_flags_raised_rank(tmp_path: Path) -> None:
    """Raising an existing layer's rank is flagged as a loosening."""
    old = default_data()
    new = default_data()
    new["layers"][2]["rank"] = 70
    args = ["policy", "diff", str(write_yaml(tmp_path, old, "old.yaml"))]
    result = runner.invoke(app, [*args, str(write_yaml(tmp_path, new, "new.yaml"))])
    assert "LOOSENED: rank raised" in result.output


# --------------------------------------------------------------------------- 7. did you mean


@pytest.mark.parametrize(
    ("where", "field"),
    [("applies_to", "vetoes[0].applies_to[3]"), ("holder", "vetoes[0].holder")],
)
def test_misspelt_layer_in_veto_gets_did_you_mean(tmp_path: Path, where: str, field: str) -> None:
    """A misspelt layer name in a veto is located (FILE:LINE) and suggests the closest layer."""
    data = default_data()
    if where == "holder":
        data["vetoes"][0]["holder"] = "creatr"
        want = "creator"
    else:
        data["vetoes"][0]["applies_to"][3] = "individul"
        want = "individual"
    path = write_yaml(tmp_path, data)
    code, output = check(path)
    assert code == 1
    assert f"{field}: expected one of " in output and f"(did you mean '{want}'?)" in output
    line = next(
        n
        for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if ("creatr" if where == "holder" else "individul") in text
    )
    assert f"{path}:{line}:" in output


def test_misspelt_principal_layer_gets_did_you_mean(tmp_path: Path) -> None:
    """principals[].layer misspelt gets a did-you-mean; a name far from all gets none."""
    data = default_data()
    data["principals"][1]["layer"] = "goverment"
    code, output = check(write_yaml(tmp_path, data))
    assert code == 1 and "(did you mean 'government'?)" in output
    data["principals"][1]["layer"] = "zzzzzz"
    code, output = check(write_yaml(tmp_path, data))
    assert code == 1 and "did you mean" not in output
