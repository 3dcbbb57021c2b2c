"""Replay and the red-line projection honour the base's device and dtype settings."""

from __future__ import annotations

import copy
import hashlib
from functools import partial
from pathlib import Path

import pytest
import torch
from test_replay import SLOT, _policy, _record

from layerfed.federation.replay import model_stack, replay_run
from layerfed.layers.base import base_parameters
from layerfed.layers.device import DeviceSettingError
from layerfed.layers.protect import ProtectionError, base_digest, collect_activations
from layerfed.simulation.tiny import build_tiny_model

ROWS = [(5, 6, 7), (8, 9, 10), (11, 12, 13, 14)]


def _bf16_and_widened() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The tiny base in bfloat16, and the same values in float32."""
    narrow = build_tiny_model(0).to(torch.bfloat16)
    return narrow, copy.deepcopy(narrow).float()


def test_bfloat16_base_gives_the_float32_activations_and_digest_of_its_values() -> None:
    """A bfloat16 base yields bit for bit the activations and recipe digest of the same values
    in float32 (so the same bases and slot A); its weights stay bfloat16, unchanged."""
    narrow, wide = _bf16_and_widened()
    before = {k: v.clone() for k, v in narrow.state_dict().items()}
    modules = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    got = collect_activations(narrow, ROWS, modules)
    want = collect_activations(wide, ROWS, modules)
    for m in modules:
        assert got[m].dtype == want[m].dtype and (got[m] == want[m]).all(), m
    assert base_digest(narrow) == base_digest(wide)
    assert base_digest(narrow) != base_digest(build_tiny_model(0))  # other values, other digest
    after = narrow.state_dict()
    assert all(after[k].dtype == torch.bfloat16 for k in before if before[k].is_floating_point())
    assert all(torch.equal(before[k], after[k]) for k in before)


def _digest_before(model: torch.nn.Module) -> str:
    """base_digest as it was before narrow dtypes were widened (every tensor's own bytes)."""
    h = hashlib.sha256(b"layerfed/base/v1\n")
    for name, tensor in sorted(base_parameters(model).items()):
        data = tensor.detach().cpu().contiguous()
        h.update(f"{name}\n{data.dtype}\n{tuple(data.shape)}\n".encode())
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return "sha256:" + h.hexdigest()


def test_float32_base_digest_is_unchanged() -> None:
    """A float32 base hashes as before (recorded recipes stay valid); float16 as its widening."""
    model = build_tiny_model(0)
    assert base_digest(model) == _digest_before(model)
    half = copy.deepcopy(model).to(torch.float16)
    assert base_digest(half) != _digest_before(half)
    assert base_digest(half) == _digest_before(half.float())


def test_meta_base_cannot_collect_activations() -> None:
    """A base on the meta device (no weights) is a ProtectionError naming the device."""
    meta = build_tiny_model(0).to("meta")
    with pytest.raises(ProtectionError, match="meta device"):
        collect_activations(meta, ROWS, ["transformer.h.0.attn.c_attn"])


def test_replay_stack_takes_device_and_dtype(tmp_path: Path) -> None:
    """model_stack places the base as asked (slots stay float32), refuses an absent device
    naming it, and a bfloat16 replay judges a recorded run as the float32 one does."""
    policy = _policy(tmp_path, "lenient")
    stack, _ = model_stack(policy, 0, dtype="bfloat16")
    assert {p.dtype for p in stack.model.parameters()} == {torch.bfloat16}
    stack.activate([SLOT])
    assert all(a.dtype.name == "float32" for a in stack.get_arrays(SLOT).values())
    with pytest.raises(DeviceSettingError, match="device: expected an available CUDA device"):
        model_stack(policy, 0, device="cuda:7")
    _record(tmp_path / "run", policy)
    fp32 = replay_run(tmp_path / "run", policy, model_stack)
    bf16 = replay_run(tmp_path / "run", policy, partial(model_stack, dtype="bfloat16"))
    assert [r.replayed for r in bf16.rows] == [r.replayed for r in fp32.rows]
    assert [r.replayed.decision for r in bf16.rows] == ["committed", "committed"]
    assert bf16.versions == fp32.versions == {str(SLOT): (2, 2)}
