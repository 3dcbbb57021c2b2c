"""The slot store: versioned slots on disk, each version a PEFT adapter folder.

Layout under ``root``::

    manifest.json                       slots, versions, memories, A seeds, digests,
                                        the base's red-line digest
    slots/<layer>/<key>/v000001/
        adapter_config.json             a PEFT LoraConfig
        adapter_model.safetensors       A (from the seed) and B = sum of the memories' B
        memories.safetensors            each memory's B, by array name

A version is committed when the manifest names it. Every file is written to a
temporary name, fsynced and renamed; the version folder is renamed into place
before the manifest (itself written the same way) points at it. Reads check
each file's SHA-256 against the manifest, so a corrupt or partial file raises
:class:`SlotStoreError` naming it while earlier versions stay loadable. Arrays
are read on demand; only a small LRU of recent loads stays in RAM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from layerfed.atomic import fsync_dir, write_atomic
from layerfed.layers.base import linear_modules
from layerfed.layers.errors import ArrayError, SlotStoreError
from layerfed.layers.slots import SlotId, SlotSpec

__all__ = ["SlotStore"]

log = logging.getLogger("layerfed")

MANIFEST = "manifest.json"
CONFIG = "adapter_config.json"
ADAPTER = "adapter_model.safetensors"
MEMORIES = "memories.safetensors"
FORMAT = 1


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _peft_files(spec: SlotSpec, arrays: Mapping[str, np.ndarray]) -> dict[str, bytes]:
    a = spec.a_matrices()
    tensors: dict[str, np.ndarray] = {}
    for module, b in spec.summed_b(arrays).items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a[module]
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
    config = {"peft_type": "LORA", "base_model_name_or_path": None, **spec.peft_config()}
    mems = {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}
    return {
        CONFIG: json.dumps(config, indent=2, sort_keys=True).encode(),
        ADAPTER: st_save(tensors, metadata={"format": "pt", **_basis_meta(spec)}),
        MEMORIES: st_save(mems, metadata={"slot": str(spec.slot)}),
    }


def _basis_meta(spec: SlotSpec) -> dict[str, str]:
    """The red-line projection basis A was projected with (none: no entry, bytes unchanged)."""
    return {} if spec.basis_digest is None else {"layerfed_basis": spec.basis_digest}


class SlotStore:
    """Versioned, atomically written slots under ``root``; one writer at a time."""

    def __init__(self, root: Path, *, cache_size: int = 4) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._cache: OrderedDict[tuple[SlotId, int], dict[str, np.ndarray]] = OrderedDict()
        self._cache_size = cache_size

    @property
    def cached(self) -> list[tuple[SlotId, int]]:
        """``(slot, version)`` pairs held in RAM, least recently used first."""
        return list(self._cache)

    # -- manifest -----------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        """The manifest: ``{"format": 1, "slots": {"layer/key": {"current", "versions"}}}``."""
        path = self.root / MANIFEST
        if not path.exists():
            return {"format": FORMAT, "slots": {}}
        try:
            data = json.loads(path.read_bytes())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SlotStoreError(
                f"{path}: expected a JSON manifest, got unreadable data: {e}"
            ) from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SlotStoreError(
                f"{path}: expected a manifest with format {FORMAT}, got {data!r:.80}"
            )
        if not isinstance(data.get("slots"), dict):
            raise SlotStoreError(
                f"{path}: expected a 'slots' object, got {data.get('slots')!r:.80}"
            )
        return data

    def versions(self, slot: SlotId) -> list[int]:
        """Committed versions of ``slot``, oldest first."""
        entry = self.manifest()["slots"].get(str(slot), {"versions": {}})
        return sorted(int(v) for v in entry["versions"])

    def record(self, slot: SlotId, version: int | None = None) -> dict[str, Any]:
        """The manifest entry of one committed version (latest by default)."""
        entry = self.manifest()["slots"].get(str(slot))
        if entry is None:
            raise SlotStoreError(f"{self.root / MANIFEST}: expected slot {slot}, got no such slot")
        try:
            v = int(entry["current"]) if version is None else version
            rec = entry["versions"].get(str(v))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SlotStoreError(
                f"{self.root / MANIFEST}: slot {slot}: expected 'current' and 'versions', "
                f"got {entry!r:.80}"
            ) from e
        if not isinstance(rec, dict) or not {"dir", "files", "spec"} <= set(rec):
            raise SlotStoreError(
                f"{self.root / MANIFEST}: slot {slot}: expected a version in "
                f"{sorted(int(k) for k in entry['versions'])}, got {v}"
            )
        return {"version": v, **rec}

    def spec(self, slot: SlotId, version: int | None = None) -> SlotSpec:
        """The spec stored with a version."""
        rec = self.record(slot, version)
        try:
            return SlotSpec.from_json(rec["spec"])
        except (KeyError, TypeError, ValueError) as e:
            raise SlotStoreError(
                f"{self.root / MANIFEST}: slot {slot} v{rec['version']}: expected a slot spec, "
                f"got {rec.get('spec')!r:.80}"
            ) from e

    def path(self, slot: SlotId, version: int | None = None) -> Path:
        """The folder of one version: a PEFT adapter folder."""
        return self.root / str(self.record(slot, version)["dir"])

    def redline_digest(self) -> str | None:
        """The red-line digest recorded with :meth:`record_redlines`, if any."""
        value = self.manifest().get("redline_digest")
        return None if value is None else str(value)

    # -- write --------------------------------------------------------------------

    def record_redlines(self, digest: str) -> None:
        """Record the base model's red-line digest (checked by stacks built from this store)."""
        manifest = self.manifest()
        manifest["redline_digest"] = digest
        self._write_manifest(manifest)

    def _write_manifest(self, manifest: Mapping[str, Any]) -> None:
        data = json.dumps(manifest, indent=2, sort_keys=True).encode()
        write_atomic(self.root / MANIFEST, data)

    def save(
        self,
        slot: SlotId,
        arrays: Mapping[str, np.ndarray],
        spec: SlotSpec,
        info: Mapping[str, Any] | None = None,
    ) -> int:
        """Commit ``arrays`` (the slot's memory Bs) as a new version; returns its number.

        ``info`` is extra JSON stored in the manifest (e.g. round, red-line digest).
        """
        if spec.slot != slot:
            raise ArrayError(f"save {slot}: expected a spec for that slot, got {spec.slot}")
        spec.check(arrays)
        files = _peft_files(spec, arrays)
        manifest = self.manifest()
        entry = manifest["slots"].setdefault(str(slot), {"current": 0, "versions": {}})
        version = max((int(v) for v in entry["versions"]), default=0) + 1
        rel = Path("slots", slot.layer, slot.key, f"v{version:06d}")
        self._write_folder(self.root / rel, files)
        entry["versions"][str(version)] = {
            "dir": rel.as_posix(),
            "files": {name: _sha256(data) for name, data in files.items()},
            "spec": spec.to_json(),
            "info": json.loads(json.dumps(dict(info or {}))),
            "saved": datetime.now(UTC).isoformat(),
        }
        entry["current"] = version
        self._write_manifest(manifest)
        log.info("saved slot %s version %s", slot, version)
        return version

    def prune(self, slot: SlotId, keep: int) -> list[int]:
        """Drop all but the newest ``keep`` versions of ``slot``; the versions dropped.

        The manifest forgets them first, then their folders go (a crash in between
        leaves only unreferenced folders).
        """
        if keep < 1:
            raise SlotStoreError(f"prune {slot}: expected keep >= 1, got {keep}")
        manifest = self.manifest()
        entry = manifest["slots"].get(str(slot))
        old = self.versions(slot)[:-keep]
        if entry is None or not old:
            return []
        dirs = [self.root / str(entry["versions"].pop(str(v))["dir"]) for v in old]
        self._write_manifest(manifest)
        for path in dirs:
            shutil.rmtree(path, ignore_errors=True)
        for v in old:
            self._cache.pop((slot, v), None)
        return old

    def _write_folder(self, final: Path, files: Mapping[str, bytes]) -> None:
        tmp = self.root / "tmp" / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        for name, data in files.items():
            write_atomic(tmp / name, data)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # left by a save that never reached the manifest
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)

    # -- read ---------------------------------------------------------------------

    def load(self, slot: SlotId, version: int | None = None) -> dict[str, np.ndarray]:
        """The memory Bs of a version (latest by default), checked against the manifest."""
        rec = self.record(slot, version)
        key = (slot, int(rec["version"]))
        if key not in self._cache:
            self._cache[key] = self._read(slot, rec)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return {k: v.copy() for k, v in self._cache[key].items()}

    def _read(self, slot: SlotId, rec: Mapping[str, Any]) -> dict[str, np.ndarray]:
        spec = self.spec(slot, int(rec["version"]))
        path = self.root / rec["dir"] / MEMORIES
        data = self._checked_bytes(path, rec, slot)
        try:
            arrays = st_load(data)
            spec.check(arrays)
        except (SafetensorError, ArrayError, ValueError) as e:
            raise SlotStoreError(f"{path}: expected the slot's memory arrays, got: {e}") from e
        return arrays

    def _checked_bytes(self, path: Path, rec: Mapping[str, Any], slot: SlotId) -> bytes:
        later = f"; earlier committed versions stay loadable: {self._earlier(slot, rec)}"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SlotStoreError(f"{path}: expected a slot file, got {e.strerror}{later}") from e
        want = rec["files"][path.name]
        got = _sha256(data)
        if got != want:
            raise SlotStoreError(
                f"{path}: expected {want}, got {got} ({len(data)} bytes; corrupt or partial){later}"
            )
        return data

    def _earlier(self, slot: SlotId, rec: Mapping[str, Any]) -> list[int]:
        return [v for v in self.versions(slot) if v < int(rec["version"])]

    def verify(self, slot: SlotId, version: int | None = None) -> None:
        """Check every file of a version against the manifest digests."""
        rec = self.record(slot, version)
        for name in rec["files"]:
            self._checked_bytes(self.root / rec["dir"] / name, rec, slot)

    # -- export -------------------------------------------------------------------

    def export_peft(
        self, slot: SlotId, base_model: torch.nn.Module, out_dir: Path, version: int | None = None
    ) -> Path:
        """Write a folder ``PeftModel.from_pretrained(base_model, out_dir)`` loads."""
        rec = self.record(slot, version)
        spec = self.spec(slot, int(rec["version"]))
        _check_base(spec, base_model)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG, ADAPTER):
            write_atomic(out / name, self._checked_bytes(self.root / rec["dir"] / name, rec, slot))
        return out


def _check_base(spec: SlotSpec, base_model: torch.nn.Module) -> None:
    modules = linear_modules(base_model)
    for t in spec.targets:
        module = modules.get(t.module)
        weight = getattr(module, "weight", None)
        want = (
            (t.in_features, t.out_features) if t.fan_in_fan_out else (t.out_features, t.in_features)
        )
        got = None if weight is None else tuple(weight.shape)
        if got != want:
            raise SlotStoreError(
                f"export {spec.slot}: module {t.module!r}: expected a base weight of shape {want}, "
                f"got {got}"
            )
