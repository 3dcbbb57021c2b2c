"""`policy check` on the policy's own base model (names only, no weights) and reachability."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from policy_helpers import default_data, write_yaml
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from layerfed.cli import app
from layerfed.governance.reachability import UNSAMPLED_TASK_BOUND
from layerfed.layers.param_names import read_param_names
from layerfed.layers.params import read_model_params

runner = CliRunner()


def _llama(folder: Path, *, tie: bool) -> Path:
    """A tiny random Llama saved as a local HF folder (nothing downloaded)."""
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


def _llama_data(path: str) -> dict[str, Any]:
    data = default_data()
    for layer in data["layers"]:
        layer["scope"]["include"] = ["model.layers.*.mlp.down_proj.weight"]
    data["red_lines"]["parameters"] = ["model.embed_tokens.weight", "model.norm.weight"]
    data["base_model"] = {"path": path}
    return data


@pytest.mark.parametrize("tie", [False, True])
def test_names_from_headers_equal_the_meta_build(tmp_path: Path, tie: bool) -> None:
    """Names, shapes and ties read from safetensors headers equal the meta-device model's."""
    folder = str(_llama(tmp_path / "m", tie=tie))
    fast, meta = read_param_names(folder), read_model_params(folder)
    assert fast.shapes == meta.shapes and fast.ties == meta.ties
    assert bool(fast.ties) is tie


def test_builtin_names_equal_the_loaded_builtin() -> None:
    """builtin:tiny's cached names, shapes and ties equal the loaded built-in's."""
    fast, loaded = read_param_names("builtin:tiny"), read_model_params("builtin:tiny")
    assert fast.shapes == loaded.shapes and fast.ties == loaded.ties


def test_check_without_model_uses_the_builtin_base(tmp_path: Path) -> None:
    """Without --model, a scope matching no parameter of builtin:tiny is an error, exit 1."""
    data = default_data()
    data["layers"][1]["scope"]["include"] = ["transformer.h.9.mlp.c_fc.weight"]
    result = runner.invoke(app, ["policy", "check", str(write_yaml(tmp_path, data))])
    assert result.exit_code == 1, result.output
    assert "layers[1].scope" in result.output and "the server refuses to start" in result.output


def test_check_without_model_uses_a_relative_local_folder(tmp_path: Path) -> None:
    """A base_model path relative to the policy file is read; a scope matching none fails."""
    _llama(tmp_path / "m", tie=True)
    data = _llama_data("m")
    ok = runner.invoke(app, ["policy", "check", str(write_yaml(tmp_path, data))])
    assert ok.exit_code == 0, ok.output
    assert (
        "scopes matched on" in ok.output
        and "lm_head.weight = model.embed_tokens.weight" in ok.output
    )
    data["layers"][0]["scope"]["include"] = ["model.layers.*.mlp.nosuch.weight"]
    bad = runner.invoke(app, ["policy", "check", str(write_yaml(tmp_path, data))])
    assert bad.exit_code == 1 and "layers[0].scope" in bad.output, bad.output


def test_check_with_unreadable_base_model_warns_and_says_so(tmp_path: Path) -> None:
    """A missing base_model folder is a warning, and the output says nothing was matched."""
    result = runner.invoke(app, ["policy", "check", str(write_yaml(tmp_path, _llama_data("gone")))])
    assert result.exit_code == 0, result.output
    assert "not matched against a model" in result.output


_TIMED = """
import resource, sys, time
sys.argv = ["layerfed", "policy", "check", sys.argv[1]]
from layerfed.cli import main
try:
    main()
except SystemExit as e:
    code = e.code
usage = resource.getrusage(resource.RUSAGE_SELF)
print("CPU", usage.ru_utime + usage.ru_stime, "TORCH", "torch" in sys.modules, "RC", code)
"""


@pytest.mark.parametrize("which", ["builtin", "llama"])
def test_check_reads_names_in_under_two_cpu_seconds(tmp_path: Path, which: str) -> None:
    """policy check on builtin:tiny or a Llama folder imports no torch and takes <= 2 CPU s."""
    if which == "builtin":
        read_param_names("builtin:tiny")  # the first read of a built-in fills the cache
        path = write_yaml(tmp_path, default_data())
    else:
        _llama(tmp_path / "m", tie=False)
        path = write_yaml(tmp_path, _llama_data("m"))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_TIMED), str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    words = done.stdout.split()
    cpu = float(words[words.index("CPU") + 1])
    assert words[words.index("TORCH") + 1] == "False", done.stdout
    assert words[words.index("RC") + 1] in ("None", "0"), done.stdout + done.stderr
    assert cpu <= 2.0, done.stdout


def _scenario(tmp_path: Path, **extra: Any) -> Path:
    scenario = {
        "name": "reach",
        "instances": [{"id": "rater-1", "layers": ["creator"]}],
        "populations": [
            {
                "count": 10,
                "id_prefix": "inst-",
                "jurisdictions": ["eu", "us"],
                "groups": [["g1"], ["g2"]],
                "layers": ["government", "community", "in_group", "individual"],
            }
        ],
        **extra,
    }
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario), encoding="utf-8")
    return path


def test_min_clients_beyond_sampling_is_an_error_with_the_numbers(tmp_path: Path) -> None:
    """min_clients 100000 with 2 instances sampled per round: exit 1 naming both numbers."""
    data = default_data()
    data["layers"][2]["min_clients"] = 100000
    scenario = _scenario(tmp_path, sample_per_layer={"community": 2})
    args = ["policy", "check", str(write_yaml(tmp_path, data)), "--scenario", str(scenario)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert "layers[2].min_clients: expected min_clients <= 2" in out
    assert "samples 2 of 10 instance(s)" in out and "got 100000" in out


def test_min_clients_beyond_a_jurisdiction_is_an_error(tmp_path: Path) -> None:
    """A government slot holds one jurisdiction's members: min_clients 6 of 5 cannot commit."""
    data = default_data()
    data["layers"][1]["min_clients"] = 6
    args = [
        "policy",
        "check",
        str(write_yaml(tmp_path, data)),
        "--scenario",
        str(_scenario(tmp_path)),
    ]
    result = runner.invoke(app, args)
    out = " ".join(result.output.split())
    assert result.exit_code == 1 and "expected min_clients <= 5" in out, out
    data["layers"][1]["min_clients"] = 5
    args[2] = str(write_yaml(tmp_path, data))
    assert runner.invoke(app, args).exit_code == 0


def test_unsampled_million_instances_are_refused_until_sampled(tmp_path: Path) -> None:
    """1,000,000 instances without sample_per_layer: an error naming the bound; sampled: ok."""
    policy = write_yaml(tmp_path, default_data())
    scenario = _scenario(tmp_path, sample_per_layer={"creator": 1})
    raw = yaml.safe_load(scenario.read_text(encoding="utf-8"))
    raw["populations"][0]["count"] = 1_000_000
    scenario.write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = runner.invoke(app, ["policy", "check", str(policy), "--scenario", str(scenario)])
    out = " ".join(result.output.split())
    assert result.exit_code == 1, out
    assert f"more than {UNSAMPLED_TASK_BOUND:,} instances" in out and "all 1,000,000" in out
    raw["sample_per_layer"] = {
        k: 2 for k in ("creator", "government", "community", "in_group", "individual")
    }
    scenario.write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = runner.invoke(app, ["policy", "check", str(policy), "--scenario", str(scenario)])
    assert result.exit_code == 0, result.output
