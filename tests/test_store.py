"""The slot store: versions, atomic writes, PEFT export, typed errors on corrupt files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from transformers import GPT2Config, GPT2LMHeadModel

from layerfed.governance.schema import Policy
from layerfed.layers import (
    ArrayError,
    LayerStack,
    SlotId,
    SlotStore,
    SlotStoreError,
    slots_for_instance,
)
from layerfed.simulation.tiny import build_tiny_model

DEFAULT = Path(__file__).resolve().parents[1] / "examples" / "policies" / "default.yaml"
POLICY = Policy.model_validate(yaml.safe_load(DEFAULT.read_text(encoding="utf-8")))
IDS = torch.tensor([[1, 36, 37, 19, 26, 6, 41, 3, 111]])
SLOT = SlotId("individual", "i7")


def _stack(slot: SlotId = SLOT, seed: int = 0) -> LayerStack:
    stack = LayerStack(POLICY, build_tiny_model(0))
    stack.activate([slot])
    rng = np.random.default_rng(seed)
    shapes = stack.spec(slot).shapes()
    stack.set_arrays(slot, {k: rng.normal(0, 0.2, s).astype(np.float32) for k, s in shapes.items()})
    return stack


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=IDS).logits
    return out


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_save_load_versions(tmp_path: Path) -> None:
    """Each save commits a new version; load returns it bit-identically, latest by default."""
    store = SlotStore(tmp_path)
    s1, s2 = _stack(seed=1), _stack(seed=2)
    v1 = store.save(SLOT, s1.get_arrays(SLOT), s1.spec(SLOT), {"round": 1})
    v2 = store.save(SLOT, s2.get_arrays(SLOT), s2.spec(SLOT), {"round": 2})
    assert (v1, v2) == (1, 2) and store.versions(SLOT) == [1, 2]
    assert _same(store.load(SLOT), s2.get_arrays(SLOT))
    assert _same(store.load(SLOT, 1), s1.get_arrays(SLOT))
    assert _same(SlotStore(tmp_path).load(SLOT, 1), s1.get_arrays(SLOT))


def test_manifest_records_slot_state(tmp_path: Path) -> None:
    """The manifest is JSON naming slots, versions, memories, A seeds and file digests."""
    store = SlotStore(tmp_path)
    stack = _stack()
    store.save(SLOT, stack.get_arrays(SLOT), stack.spec(SLOT), {"redlines": stack.redline_digest})
    data = json.loads((tmp_path / "manifest.json").read_text())
    rec = data["slots"]["individual/i7"]["versions"]["1"]
    assert data["slots"]["individual/i7"]["current"] == 1
    assert rec["spec"]["memories"] == ["stm", "ltm"]
    assert rec["spec"]["a_seed"] == stack.a_seed(SLOT)
    assert rec["info"]["redlines"] == stack.redline_digest
    assert set(rec["files"]) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "memories.safetensors",
    }
    assert all(d.startswith("sha256:") for d in rec["files"].values())
    assert store.manifest() == data


def test_export_loads_in_plain_peft(tmp_path: Path) -> None:
    """An exported slot (memories summed) loads with PeftModel.from_pretrained: same logits."""
    store = SlotStore(tmp_path / "store")
    stack = _stack()
    store.save(SLOT, stack.get_arrays(SLOT), stack.spec(SLOT))
    out = store.export_peft(SLOT, build_tiny_model(0), tmp_path / "export")
    want = _logits(stack.model)
    for folder in (out, store.path(SLOT)):
        plain = PeftModel.from_pretrained(build_tiny_model(0), str(folder))
        torch.testing.assert_close(_logits(plain), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, _logits(build_tiny_model(0)), atol=1e-3)


def test_reload_into_new_stack(tmp_path: Path) -> None:
    """Every slot of an instance saved and loaded into a fresh stack gives the same logits."""
    slots = slots_for_instance(POLICY, "i7", "eu", ["g1"])
    stack = LayerStack(POLICY, build_tiny_model(0))
    stack.activate(slots)
    store = SlotStore(tmp_path)
    rng = np.random.default_rng(0)
    for slot in slots:
        arrays = {k: rng.normal(0, 0.1, v.shape) for k, v in stack.get_arrays(slot).items()}
        stack.set_arrays(slot, {k: v.astype(np.float32) for k, v in arrays.items()})
        store.save(slot, stack.get_arrays(slot), stack.spec(slot))
    fresh = LayerStack(POLICY, build_tiny_model(0), expected_redline_digest=stack.redline_digest)
    fresh.activate(slots)
    for slot in slots:
        fresh.set_arrays(slot, store.load(slot))
    torch.testing.assert_close(_logits(fresh.model), _logits(stack.model))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_file_typed_error_previous_usable(tmp_path: Path, damage: str) -> None:
    """A corrupt, partial or missing file raises SlotStoreError naming it; v1 still loads."""
    store = SlotStore(tmp_path)
    s1, s2 = _stack(seed=1), _stack(seed=2)
    store.save(SLOT, s1.get_arrays(SLOT), s1.spec(SLOT))
    store.save(SLOT, s2.get_arrays(SLOT), s2.spec(SLOT))
    target = store.path(SLOT) / "memories.safetensors"
    data = target.read_bytes()
    if damage == "flip":
        target.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    elif damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    else:
        target.unlink()
    fresh = SlotStore(tmp_path)
    with pytest.raises(SlotStoreError, match=re.escape(str(target))) as err:
        fresh.load(SLOT)
    assert "[1]" in str(err.value)  # names the earlier committed version
    assert _same(fresh.load(SLOT, 1), s1.get_arrays(SLOT))


def test_corrupt_export_file_typed_error(tmp_path: Path) -> None:
    """Exporting a version whose adapter file is damaged raises SlotStoreError naming the file."""
    store = SlotStore(tmp_path / "s")
    stack = _stack()
    store.save(SLOT, stack.get_arrays(SLOT), stack.spec(SLOT))
    adapter = store.path(SLOT) / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    with pytest.raises(SlotStoreError, match=r"adapter_model\.safetensors"):
        store.export_peft(SLOT, build_tiny_model(0), tmp_path / "out")
    with pytest.raises(SlotStoreError, match=r"adapter_model\.safetensors"):
        store.verify(SLOT)


def test_corrupt_manifest_typed_error(tmp_path: Path) -> None:
    """A truncated manifest raises SlotStoreError naming manifest.json."""
    store = SlotStore(tmp_path)
    stack = _stack()
    store.save(SLOT, stack.get_arrays(SLOT), stack.spec(SLOT))
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])
    with pytest.raises(SlotStoreError, match=r"manifest\.json"):
        SlotStore(tmp_path).load(SLOT)


def test_partial_save_leaves_committed_version(tmp_path: Path) -> None:
    """An uncommitted version folder (crash before the manifest) is ignored and later replaced."""
    store = SlotStore(tmp_path)
    s1, s2 = _stack(seed=1), _stack(seed=2)
    store.save(SLOT, s1.get_arrays(SLOT), s1.spec(SLOT))
    orphan = store.path(SLOT).parent / "v000002"
    orphan.mkdir()
    (orphan / "memories.safetensors").write_bytes(b"partial")
    assert store.versions(SLOT) == [1]
    assert _same(store.load(SLOT), s1.get_arrays(SLOT))
    assert store.save(SLOT, s2.get_arrays(SLOT), s2.spec(SLOT)) == 2
    assert _same(SlotStore(tmp_path).load(SLOT), s2.get_arrays(SLOT))
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_rejected_save_changes_nothing(tmp_path: Path) -> None:
    """Arrays that do not fit the spec are refused before any file is written."""
    store = SlotStore(tmp_path)
    stack = _stack()
    store.save(SLOT, stack.get_arrays(SLOT), stack.spec(SLOT))
    before = (tmp_path / "manifest.json").read_bytes()
    bad = {k: v[:3] for k, v in stack.get_arrays(SLOT).items()}
    with pytest.raises(ArrayError, match="expected shape"):
        store.save(SLOT, bad, stack.spec(SLOT))
    other = SlotId("individual", "i8")
    with pytest.raises(ArrayError, match="expected a spec for that slot"):
        store.save(other, stack.get_arrays(SLOT), stack.spec(SLOT))
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert store.versions(other) == []


def test_slots_loaded_on_demand(tmp_path: Path) -> None:
    """Only a few recently loaded slots stay in RAM; others are read from disk when asked."""
    store = SlotStore(tmp_path, cache_size=2)
    stack = _stack()
    arrays = stack.get_arrays(SLOT)
    keys = [f"i{n}" for n in range(5)]
    for key in keys:
        slot = SlotId("individual", key)
        renamed = {k.replace("/i7/", f"/{key}/"): v for k, v in arrays.items()}
        spec = LayerStack(POLICY, build_tiny_model(0)).spec(slot)
        store.save(slot, renamed, spec)
    assert store.cached == []
    for key in keys:
        store.load(SlotId("individual", key))
    assert store.cached == [(SlotId("individual", "i3"), 1), (SlotId("individual", "i4"), 1)]


def test_export_refuses_mismatched_base(tmp_path: Path) -> None:
    """Exporting onto a base whose target weights have other shapes raises SlotStoreError."""
    store = SlotStore(tmp_path)
    stack = _stack()
    store.save(SLOT, stack.get_arrays(SLOT), stack.spec(SLOT))
    other = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(SlotStoreError, match="expected a base weight of shape"):
        store.export_peft(SLOT, other, tmp_path / "out")
