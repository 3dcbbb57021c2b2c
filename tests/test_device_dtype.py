"""Device and dtype as deployment settings: names, loading, slots, red lines, probes (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from layerfed.clients.config import ConfigError, InstanceConfig
from layerfed.federation.probes import ProbeRunner
from layerfed.federation.run_config import RunConfigError, RunSettings
from layerfed.governance.schema import Policy
from layerfed.layers.base import load_base
from layerfed.layers.device import (
    DeviceSettingError,
    check_device,
    check_dtype,
    float32_compute,
    model_device,
    resolve_device,
)
from layerfed.layers.probe_batch import exact_margin
from layerfed.layers.redlines import RedLineDtypeError, digest_dtype, redline_digest
from layerfed.layers.slots import slots_for_instance
from layerfed.layers.stack import LayerStack
from layerfed.simulation.settings import SimSettings
from layerfed.wire.node_config import NodeConfig, NodeConfigError

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = not torch.cuda.is_available()


def policy() -> Policy:
    """The default example policy."""
    data = yaml.safe_load((ROOT / "examples/policies/default.yaml").read_text(encoding="utf-8"))
    return Policy.model_validate(data)


def stack(dtype: str) -> LayerStack:
    """A stack on the built-in tiny base loaded in ``dtype``, an instance's slots active."""
    pol = policy()
    model, tok = load_base(pol.base_model, dtype=dtype)
    st = LayerStack(pol, model, tok)
    st.activate(slots_for_instance(pol, "a", "eu", ["g1"]))
    return st


def test_names_checked_without_hardware() -> None:
    """Every documented device and dtype name passes; others raise naming the setting."""
    for name in ("auto", "cpu", "cuda", "cuda:3", "mps"):
        assert check_device(name) == name
    for dtype in ("float32", "bfloat16", "float16"):
        assert check_dtype(dtype) == dtype
    with pytest.raises(DeviceSettingError, match=r"--device: expected one of auto.*got 'gpu'"):
        check_device("gpu", setting="--device")
    with pytest.raises(DeviceSettingError, match=r"dtype: expected one of float32.*'int8'"):
        check_dtype("int8")


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
def test_absent_accelerator_refused_and_auto_is_cpu() -> None:
    """Without CUDA, ``cuda`` is a typed error and ``auto`` resolves to the CPU (or MPS)."""
    with pytest.raises(DeviceSettingError, match="an available CUDA device"):
        resolve_device("cuda:0")
    assert resolve_device("auto").type in {"cpu", "mps"}


def test_configs_carry_device_and_dtype(tmp_path: Path) -> None:
    """Instance TOML [model], node config and run config take device and dtype, typed errors."""
    toml = tmp_path / "i.toml"
    toml.write_text(
        '[instance]\nid = "a"\n[policy]\nfile = "p.yaml"\n[model]\ndevice = "auto"\n'
        'dtype = "bfloat16"\n',
        encoding="utf-8",
    )
    cfg = InstanceConfig.load(toml)
    assert (cfg.device, cfg.dtype, cfg.model) == ("auto", "bfloat16", None)
    toml.write_text(toml.read_text().replace("bfloat16", "bf16"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        InstanceConfig.load(toml)
    node = {"instance-id": "a", "policy": "p.yaml", "device": "cpu", "dtype": "float16"}
    assert InstanceConfig.from_node_config(node).dtype == "float16"
    assert NodeConfig.parse(node).items()["dtype"] == "float16"
    with pytest.raises(NodeConfigError, match="node config device"):
        NodeConfig.parse({**node, "device": "tpu"})
    run = RunSettings.from_config({"layerfed-device": "auto", "layerfed-dtype": "bfloat16"})
    assert (run.device, run.dtype) == ("auto", "bfloat16")
    with pytest.raises(RunConfigError, match="layerfed-dtype"):
        RunSettings.from_config({"layerfed-dtype": "half"})
    with pytest.raises(RunConfigError, match="layerfed-instance-device"):
        SimSettings(instance_device="xpu")
    sent = SimSettings(instance_dtype="bfloat16").to_config()  # what the gym's clients read
    assert SimSettings.from_config(sent).instance_placement() == ("cpu", "bfloat16")


def test_gpu_share_is_zero_without_cuda() -> None:
    """Flower's num_gpus per client: auto gives 0 on a CPU device, an explicit value is kept."""
    assert SimSettings().gpus_per_client(4) == 0.0
    assert SimSettings(num_gpus=0.5).gpus_per_client(4) == 0.5
    if NO_CUDA:
        assert SimSettings(instance_device="auto").gpus_per_client(4) == 0.0


def test_default_load_is_untouched_float32_cpu() -> None:
    """Defaults keep the base float32 on the CPU, with the same digest as before (no tag)."""
    pol = policy()
    model, _ = load_base(pol.base_model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model_device(model).type == "cpu"
    digest = redline_digest(model, pol.red_lines.parameters)
    assert ";" not in digest and digest_dtype(digest) == "float32"


def test_bf16_base_keeps_slots_float32() -> None:
    """On a bfloat16 base every LoRA weight is float32 and arrays read back float32."""
    st = stack("bfloat16")
    base = {p.dtype for n, p in st.model.named_parameters() if "lora_" not in n}
    lora = {p.dtype for n, p in st.model.named_parameters() if "lora_" in n}
    assert base == {torch.bfloat16} and lora == {torch.float32}
    slot = st.active[0]
    arrays = st.get_arrays(slot)
    assert {a.dtype for a in arrays.values()} == {np.dtype(np.float32)}
    ones = {k: np.full_like(v, 0.01) for k, v in arrays.items()}
    st.set_arrays(slot, ones)  # re-checks the red lines in bfloat16
    assert all(np.array_equal(st.get_arrays(slot)[k], ones[k]) for k in ones)


def test_redline_digest_names_its_dtype() -> None:
    """A bf16 digest is tagged; a base in another dtype than the recorded one is named so."""
    pol = policy()
    fp32 = redline_digest(load_base(pol.base_model)[0], pol.red_lines.parameters)
    model, tok = load_base(pol.base_model, dtype="bfloat16")
    bf16 = redline_digest(model, pol.red_lines.parameters)
    assert digest_dtype(bf16) == "bfloat16" and bf16 != fp32
    with pytest.raises(RedLineDtypeError, match=r"expected a base loaded in float32.*bfloat16"):
        LayerStack(pol, model, tok, expected_redline_digest=fp32)
    LayerStack(pol, model, tok, expected_redline_digest=bf16)


def test_float32_compute_restores_bits() -> None:
    """Widening a bf16 base for a re-score restores every weight bit for bit afterwards."""
    st = stack("bfloat16")
    before = {n: p.detach().clone() for n, p in st.model.named_parameters()}
    with float32_compute(st.model):
        assert {p.dtype for p in st.model.parameters()} == {torch.float32}
    after = dict(st.model.named_parameters())
    assert all(
        torch.equal(before[n], after[n]) and before[n].dtype == after[n].dtype for n in after
    )
    st.verify_redlines()


def test_gate_tolerance_per_dtype_holds() -> None:
    """Batched margins agree with float32 PEFT re-scores within the base dtype's tolerance."""
    rng = np.random.default_rng(0)
    for dtype in ("float32", "bfloat16"):
        st = stack(dtype)
        comp: dict[Any, Any] = {
            s: {
                k: rng.normal(0, 0.05, v.shape).astype(np.float32)
                for k, v in st.get_arrays(s).items()
            }
            for s in st.active
            if s.layer != "individual"
        }
        runner = ProbeRunner(st.policy, st, st.tokenizer)
        assert runner.exact_margin == exact_margin(getattr(torch, dtype))
        suites = [runner.suite(p.suite) for p in st.policy.red_lines.probes]
        batched = runner.batch.margins(suites, [comp])[0]
        exact = runner.margins_one(suites, comp)
        spread = max(float((x - y).abs().max()) for x, y in zip(batched, exact, strict=True))
        assert spread < runner.exact_margin / 2, (dtype, spread)
    assert exact_margin(torch.float32) == 1e-4  # the float32 guard as before


def test_meta_device_plans_without_weights() -> None:
    """On the meta device a random-weight config has its parameter count and dtype, no memory."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        hidden_size=1024,
        intermediate_size=5120,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    assert 4.0e8 < count < 6.5e8
    assert model_device(model).type == "meta"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU (bench/bench_gpu.py runs this on one)")
def test_bf16_stack_on_cuda_trains_float32_slots() -> None:
    """On CUDA a bf16 base and float32 slots compose, score and read back on the CPU."""
    pol = policy()
    model, tok = load_base(pol.base_model, device="cuda", dtype="bfloat16")
    st = LayerStack(pol, model, tok)
    st.activate(slots_for_instance(pol, "a", "eu", ["g1"]))
    runner = ProbeRunner(pol, st, tok)
    rate = runner.rate(pol.red_lines.probes[0].suite, {})
    assert 0.0 <= rate <= 1.0
    assert all(a.dtype == np.float32 for a in st.get_arrays(st.active[0]).values())


def test_folder_dtype_is_the_setting_not_the_checkpoint(tmp_path: Path) -> None:
    """A bfloat16-saved folder loads as float32 by default and as bfloat16 when asked."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from layerfed.governance.schema import BaseModelRef
    from layerfed.simulation.tiny import build_tiny_tokenizer

    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=512,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    build_tiny_tokenizer().save_pretrained(tmp_path)
    ref = BaseModelRef(path=str(tmp_path))
    assert {p.dtype for p in load_base(ref)[0].parameters()} == {torch.float32}
    assert {p.dtype for p in load_base(ref, dtype="bfloat16")[0].parameters()} == {torch.bfloat16}
