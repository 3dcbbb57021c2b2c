"""Refusing stored slots whose frozen A is not the one this policy and base draw.

Updates carry only B (an update names ``.lora_B`` arrays of the slot's shapes,
nothing else), so no update can bring its own A: A is always made by
:meth:`~layerfed.layers.slots.SlotSpec.a_matrices` from the slot's seed and, under a
projecting red-line policy, its basis. What can carry another A is a stored slot:
a version in a slot store (server resume, an instance's own disk). Before such a
slot is used, :func:`verify_stored_slot` checks its recorded recipe (A seed, basis
digest, rank, targets) against the expected spec, and the A actually written in its
PEFT adapter file (and the basis named in that file's metadata) bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from layerfed.layers.errors import SlotError, SlotStoreError
from layerfed.layers.slots import SlotId, SlotSpec, check_stored_spec
from layerfed.layers.store import ADAPTER, SlotStore

__all__ = ["verify_stored_slot", "verify_stored_slots"]

log = logging.getLogger("layerfed")


def verify_stored_slot(
    store: SlotStore, slot: SlotId, expected: SlotSpec, version: int | None = None
) -> None:
    """Raise :class:`SlotError` unless the stored version's A recipe and A bytes are
    ``expected``'s (``SlotStoreError`` when its files fail their manifest digests)."""
    rec = store.record(slot, version)
    where = f"{store.root / str(rec['dir'])}"
    check_stored_spec(store.spec(slot, int(rec["version"])), expected, where=where)
    store.verify(slot, int(rec["version"]))
    path = store.path(slot, int(rec["version"])) / ADAPTER
    want = expected.a_matrices()
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            got = {
                module: f.get_tensor(f"base_model.model.{module}.lora_A.weight") for module in want
            }
    except (SafetensorError, OSError) as e:
        raise SlotStoreError(f"{path}: expected a PEFT adapter with lora_A, got {e}") from e
    basis = meta.get("layerfed_basis")
    if basis != expected.basis_digest:
        raise SlotError(
            f"{path}: slot {slot}: expected A projected with basis {expected.basis_digest}, "
            f"got {basis}"
        )
    for module, a in want.items():
        if got[module].shape != a.shape or not np.array_equal(got[module], a):
            raise SlotError(
                f"{path}: slot {slot}: module {module!r}: expected the A drawn from seed "
                f"{expected.a_seed} and basis {expected.basis_digest}, got another A"
            )


def verify_stored_slots(
    store: SlotStore,
    committed: Mapping[str, Mapping[str, Any]],
    spec: Callable[[SlotId], SlotSpec],
) -> None:
    """:func:`verify_stored_slot` for every committed ``{slot: {"version": n}}`` where the
    policy or the stored slot names a projection basis (a server resume calls it; slots
    of gate-only policies are left to the checks they always had)."""
    for name, entry in sorted(committed.items()):
        slot, version = SlotId.parse(name), int(entry["version"])
        expected = spec(slot)
        if expected.basis_digest is None and store.spec(slot, version).basis_digest is None:
            continue
        verify_stored_slot(store, slot, expected, version)
        log.debug("stored slot %s v%s: A verified against seed and basis", slot, version)
