"""`layerfed model params`: a model's parameter names, shapes, ties, and the scopes matching them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from policy_helpers import default_data, write_yaml
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from layerfed.governance.cli_policy import policy_app
from layerfed.governance.model_params import ModelReader
from layerfed.layers.cli_model import model_app
from layerfed.layers.errors import BaseModelError
from layerfed.layers.params import param_rows, read_model_params

Q0 = "model.layers.0.self_attn.q_proj.weight"


def _llama(folder: Path, *, tie: bool = False) -> Path:
    """A tiny random LlamaForCausalLM saved as a local HF folder (nothing downloaded)."""
    config = LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _llama_policy(tmp_path: Path) -> Path:
    data: dict[str, Any] = default_data()
    for layer in data["layers"]:
        layer["scope"]["include"] = ["model.layers.*.mlp.down_proj.weight"]
    creator = next(la for la in data["layers"] if la["name"] == "creator")
    creator["scope"]["include"] = ["model.layers.*.self_attn.*_proj.weight"]
    creator["scope"]["exclude"] = ["model.layers.0.self_attn.v_proj.weight"]
    data["red_lines"]["parameters"] = ["model.embed_tokens.weight", "model.norm.weight"]
    data["base_model"] = {"path": "unused"}
    return write_yaml(tmp_path, data, "llama.yaml")


def test_local_folder_names_shapes_and_no_ties(tmp_path: Path) -> None:
    """A local Llama folder lists every parameter with its shape; untied embeddings tie nothing."""
    params = read_model_params(str(_llama(tmp_path / "m")))
    assert Q0 in params.names and "lm_head.weight" in params.names
    assert params.shapes[Q0] == (16, 16)
    assert params.shapes["model.layers.1.self_attn.k_proj.weight"] == (8, 16)
    assert params.ties == ()
    assert Q0 in params.lora and "model.norm.weight" not in params.lora


def test_local_folder_ties_from_architecture(tmp_path: Path) -> None:
    """With tied word embeddings, lm_head.weight is listed and tied although not in the file."""
    params = read_model_params(str(_llama(tmp_path / "m", tie=True)))
    assert params.ties == (("lm_head.weight", "model.embed_tokens.weight"),)
    assert params.shapes["lm_head.weight"] == (48, 16)


def test_rows_show_scopes_and_red_lines(tmp_path: Path) -> None:
    """Rows name the layers whose scope includes each parameter and the red lines on it."""
    from layerfed.governance.loader import load_policy

    params = read_model_params(str(_llama(tmp_path / "m", tie=True)))
    policy = load_policy(_llama_policy(tmp_path))
    rows = {r.name: r for r in param_rows(params, policy=policy)}
    assert rows[Q0].scopes == ("creator",)
    assert rows["model.layers.0.self_attn.v_proj.weight"].scopes == ()
    assert rows["model.layers.1.self_attn.v_proj.weight"].scopes == ("creator",)
    assert len(rows["model.layers.0.mlp.down_proj.weight"].scopes) == len(policy.layers) - 1
    assert rows["lm_head.weight"].red_lines == ("model.embed_tokens.weight",)
    assert rows["lm_head.weight"].tied == ("model.embed_tokens.weight",)
    assert not any(r.conflict for r in rows.values())
    only = param_rows(params, match="model.layers.*.self_attn.q_proj.weight")
    assert [r.name for r in only] == [Q0, "model.layers.1.self_attn.q_proj.weight"]


def test_cli_model_params_local_folder(tmp_path: Path) -> None:
    """The command prints name, shape, LoRA mark, scopes and red lines; --json one object a line."""
    folder = str(_llama(tmp_path / "m", tie=True))
    policy = str(_llama_policy(tmp_path))
    runner = CliRunner()
    args = [folder, "--match", "model.layers.0.self_attn.**", "--policy", policy]
    result = runner.invoke(model_app, args)
    assert result.exit_code == 0, result.output
    assert f"{Q0}  16x16  lora  scopes: creator  red lines: -" in result.output
    assert "4 of " in result.output and "0 conflict(s)" in result.output
    assert "tied (one storage): lm_head.weight = model.embed_tokens.weight" in result.output
    result = runner.invoke(model_app, [folder, "--match", Q0, "--json"])
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in result.output.splitlines()]
    assert row["name"] == Q0 and row["shape"] == [16, 16] and row["lora"] is True


def test_cli_model_params_flags_conflicts(tmp_path: Path) -> None:
    """A LoRA weight in a scope and under a red line (here through a tie) is a conflict: exit 1."""
    data = default_data()
    data["red_lines"]["parameters"] = ["model.embed_tokens.weight"]
    for layer in data["layers"]:
        layer["scope"]["include"] = ["model.layers.*.mlp.down_proj.weight"]
    data["layers"][0]["scope"]["include"] = ["lm_head.weight"]
    path = write_yaml(tmp_path, data, "bad.yaml")
    folder = str(_llama(tmp_path / "m", tie=True))
    result = CliRunner().invoke(model_app, [folder, "--policy", str(path), "--match", "lm_head.*"])
    assert result.exit_code == 1
    assert "lm_head.weight  48x16  lora  tied: model.embed_tokens.weight  scopes: creator" in (
        result.output
    )
    assert "CONFLICT" in result.output and "1 conflict(s)" in result.output
    untied = str(_llama(tmp_path / "u"))
    result = CliRunner().invoke(model_app, [untied, "--policy", str(path), "--match", "lm_head.*"])
    assert result.exit_code == 0, result.output


def test_builtin_tiny() -> None:
    """builtin:tiny (and the older 'tiny') list the gym's GPT-2 names with its tie."""
    params = read_model_params("builtin:tiny")
    assert params.ties == (("lm_head.weight", "transformer.wte.weight"),)
    assert "transformer.h.1.mlp.c_proj.weight" in params.lora
    assert read_model_params("tiny").shapes == params.shapes
    result = CliRunner().invoke(model_app, ["builtin:tiny", "--match", "lm_head.*"])
    assert result.exit_code == 0, result.output
    rows, cols = params.shapes["lm_head.weight"]
    assert rows > 900 and cols == 64  # the gym's vocabulary (~1,000 words) by its width
    assert f"lm_head.weight  {rows}x{cols}  lora  tied: transformer.wte.weight" in result.output


def test_bad_model_refused(tmp_path: Path) -> None:
    """A folder without config.json or an unknown builtin raises BaseModelError naming it."""
    with pytest.raises(BaseModelError, match=r"config\.json"):
        read_model_params(str(tmp_path))
    with pytest.raises(BaseModelError, match="nosuch"):
        read_model_params("builtin:nosuch")


def test_policy_check_model_local_folder(tmp_path: Path) -> None:
    """policy check --model FOLDER matches scopes against the folder's names (via the reader).

    A pattern that matches nothing is a warning naming it; a layer whose whole scope matches
    nothing is an error (the server would refuse to start).
    """
    folder = str(_llama(tmp_path / "m"))
    data = default_data()
    for layer in data["layers"]:
        layer["scope"]["include"] = ["model.layers.*.mlp.down_proj.weight"]
    data["layers"][0]["scope"]["include"] = [
        "model.layers.*.mlp.down_proj.weight",
        "model.layers.*.mlp.nosuch.weight",
    ]
    data["red_lines"]["parameters"] = ["model.embed_tokens.weight"]
    path = write_yaml(tmp_path, data)
    reader = ModelReader(read_model_params)
    result = CliRunner().invoke(policy_app, ["check", str(path), "--model", folder], obj=reader)
    assert result.exit_code == 0, result.output
    assert "model.layers.*.mlp.nosuch.weight" in result.output and "matching none" in result.output
    assert "warning" in result.output
    missing = CliRunner().invoke(policy_app, ["check", str(path), "--model", folder])
    assert missing.exit_code == 1 and "model reader" in missing.output
    data["layers"][0]["scope"]["include"] = ["model.layers.*.mlp.nosuch.weight"]
    empty = write_yaml(tmp_path, data)
    refused = CliRunner().invoke(policy_app, ["check", str(empty), "--model", folder], obj=reader)
    assert refused.exit_code == 1, refused.output
    assert "layers[0].scope" in refused.output and "matching none" in refused.output
