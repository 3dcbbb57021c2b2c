"""Tied parameters: red lines and scope excludes resolve over names sharing one storage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from policy_helpers import default_data, write_yaml
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from layerfed.governance.cli_policy import policy_app
from layerfed.governance.model_params import ModelReader, tie_issues
from layerfed.governance.schema import Policy
from layerfed.layers.aliases import tied_parameters
from layerfed.layers.errors import RedLineViolation, ScopeError
from layerfed.layers.memory import apply_update
from layerfed.layers.params import params_of
from layerfed.layers.redlines import check_update_names, redline_digest, verify_redlines
from layerfed.layers.slots import SlotId, slot_spec

WTE, HEAD = "transformer.wte.weight", "lm_head.weight"
HEAD_B = "individual/i7/stm/lm_head.lora_B"
WTE_B = "individual/i7/stm/transformer.wte.lora_B"


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


def _data(red: list[str], include: list[str]) -> dict[str, Any]:
    data = default_data()
    data["red_lines"]["parameters"] = red
    for layer in data["layers"]:
        if layer["name"] == "individual":
            layer["scope"]["include"] = include
    return data


def _policy(red: list[str], include: list[str]) -> Policy:
    return Policy.model_validate(_data(red, include))


def test_gpt2_ties_found_by_storage() -> None:
    """GPT-2's lm_head.weight and transformer.wte.weight are one storage under two names."""
    model = _gpt2()
    ties = tied_parameters(model)
    assert ties[HEAD] == ties[WTE] == (HEAD, WTE)
    assert set(ties) == {HEAD, WTE}
    assert params_of(model, "gpt2").ties == ((HEAD, WTE),)


@pytest.mark.parametrize(("red", "array"), [([WTE], HEAD_B), ([HEAD], WTE_B)])
def test_update_names_refused_through_tie(red: list[str], array: str) -> None:
    """A red line on either tied name refuses an update naming the other (with aliases)."""
    policy = _policy(red, [HEAD, WTE])
    aliases = tied_parameters(_gpt2())
    with pytest.raises(RedLineViolation, match="tied to red-line parameter"):
        check_update_names(policy, [array], aliases=aliases)
    with pytest.raises(RedLineViolation, match="tied to red-line parameter"):
        apply_update({array: np.zeros(2)}, {array: np.ones(2)}, 1.0, policy=policy, aliases=aliases)
    check_update_names(policy, [array])  # without the model's ties the name alone is in scope


def test_scope_exclude_resolves_over_tie() -> None:
    """Excluding one tied name excludes the other from a scope too."""
    policy = _policy([], [HEAD])
    data = _data([], [HEAD])
    next(la for la in data["layers"] if la["name"] == "individual")["scope"]["exclude"] = [WTE]
    excluded = Policy.model_validate(data)
    aliases = tied_parameters(_gpt2())
    check_update_names(policy, [HEAD_B], aliases=aliases)
    with pytest.raises(ScopeError, match="lm_head"):
        check_update_names(excluded, [HEAD_B], aliases=aliases)


@pytest.mark.parametrize("red", [[WTE], [HEAD]])
def test_slot_scope_refused_through_tie(red: list[str]) -> None:
    """A scope that reaches lm_head is refused when a red line names either tied name."""
    policy = _policy(red, [HEAD])
    with pytest.raises(RedLineViolation, match=r"lm_head\.weight"):
        slot_spec(policy, _gpt2(), SlotId("individual", "i7"))
    free = _policy(["transformer.wpe.weight"], [HEAD])
    spec = slot_spec(free, _gpt2(), SlotId("individual", "i7"))
    assert [t.module for t in spec.targets] == ["lm_head"]


def test_digest_covers_tied_names_even_if_untied() -> None:
    """A red line on wte alone also guards lm_head: untying and changing it breaks the digest."""
    model = _gpt2()
    digest = redline_digest(model, [WTE])
    assert digest == redline_digest(model, [HEAD])  # one storage, one protection
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 1.0)
    assert tied_parameters(model) == {}
    with pytest.raises(RedLineViolation):
        verify_redlines(model, [WTE], digest)


def test_policy_check_reports_tie_conflicts(tmp_path: Path) -> None:
    """policy check --model lists ties and fails a scope reaching a red line through one."""
    params = params_of(_gpt2(), "gpt2")
    bad = _policy([WTE], [HEAD])
    issues = list(tie_issues(bad, params))
    assert [p for p, _ in issues] == ["layers[4].scope.include[0]"]
    assert f"tied to red-line parameter '{WTE}'" in issues[0][1]
    assert (
        list(tie_issues(_policy([WTE, HEAD], ["transformer.h.*.mlp.c_proj.weight"]), params)) == []
    )
    reader = ModelReader(lambda _: params)
    runner = CliRunner()
    path = write_yaml(tmp_path, _data([WTE], [HEAD]))
    result = runner.invoke(policy_app, ["check", str(path), "--model", "gpt2"], obj=reader)
    assert result.exit_code == 1
    assert f"tied (one storage): {HEAD} = {WTE}" in result.output
    assert "tied to red-line parameter" in result.output
    ok = write_yaml(tmp_path, _data([WTE], ["transformer.h.*.mlp.c_proj.weight"]), "ok.yaml")
    result = runner.invoke(policy_app, ["check", str(ok), "--model", "gpt2"], obj=reader)
    assert result.exit_code == 0, result.output
