"""Committed shared slot versions, verified and saved on the instance's own disk.

When a ``train`` message brings arrays of a shared slot (one whose updates leave
the instance), the node checks them against the manifest the server signed with its
run key (:mod:`layerfed.wire.manifest`) and saves each as a new version of a
:class:`~layerfed.layers.store.SlotStore` under ``<state>/synced``: the store
:meth:`Instance.from_config <layerfed.clients.instance.Instance.from_config>` (and so
the SDK and ``layerfed instance serve``) loads its newest versions from. Every slot of
the message is verified before any is saved; a missing, unsigned or wrongly signed
manifest, or arrays whose digest differs from the signed one, raise
:class:`~layerfed.wire.manifest.ManifestError` and the versions saved before stay.
Each save records the server's run, round, version and digest; only the newest
``keep`` versions of a slot stay on disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import RecordDict

from layerfed.layers.arrays import Arrays
from layerfed.layers.errors import SlotStoreError
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack
from layerfed.layers.store import MANIFEST, SlotStore
from layerfed.wire.manifest import ManifestError, SlotManifest, verify_manifest
from layerfed.wire.protocol import Task

__all__ = ["DEFAULT_KEEP", "SYNCED_DIR", "SyncedSlot", "SyncedSlots"]

log = logging.getLogger("layerfed")

SYNCED_DIR = "synced"
"""Folder of the synced slot store under an instance's ``[storage] state``."""
DEFAULT_KEEP = 3
"""Versions of each synced slot kept by default (``[sync] keep``)."""


@dataclass(frozen=True)
class SyncedSlot:
    """The newest saved version of one synced slot (what ``instance status`` prints)."""

    slot: str
    version: int
    """The server's committed version."""
    digest: str
    """:func:`~layerfed.governance.canonical.arrays_digest` of the arrays, as the server signed it."""
    run_id: str
    round: int
    saved_at: float
    """POSIX time the instance saved it."""
    kept: int
    """Versions of the slot on disk."""

    def age(self, now: float | None = None) -> float:
        """Seconds since it was saved."""
        return max(0.0, (time.time() if now is None else now) - self.saved_at)


class SyncedSlots:
    """The instance's store of synced shared slots, under ``root`` (``<state>/synced``)."""

    def __init__(
        self, root: Path, server_key: Ed25519PublicKey | None, keep: int = DEFAULT_KEEP
    ) -> None:
        if keep < 1:
            raise SlotStoreError(f"{root}: sync keep: expected >= 1, got {keep}")
        self.root = root
        self.server_key = server_key
        """The run's server key the node trusts; None: nothing is saved (logged once)."""
        self.keep = keep
        self._warned = False

    @staticmethod
    def exists(root: Path) -> bool:
        """Whether ``root`` holds a synced store (anything was saved)."""
        return (root / MANIFEST).is_file()

    def store(self) -> SlotStore:
        """The slot store (created on first use)."""
        return SlotStore(self.root)

    def accept(
        self, content: RecordDict, task: Task, sent: Mapping[SlotId, Arrays], stack: LayerStack
    ) -> list[SlotId]:
        """Verify every sent slot against the signed manifest, then save the new ones.

        Returns the slots saved (a version already saved is not saved again).
        :class:`ManifestError` before anything is written when any check fails.
        """
        if not sent:
            return []
        if self.server_key is None:
            if not self._warned:
                log.warning(
                    "instance %s: synced slots not saved: no [sync] server_key to verify them",
                    task.instance_id,
                )
                self._warned = True
            return []
        manifest = verify_manifest(
            content,
            self.server_key,
            run_id=task.run_id,
            round_=task.round,
            instance_id=task.instance_id,
        )
        store = self.store()
        plan = [
            (slot, arrays, self._check(store, manifest, task, slot, arrays))
            for slot, arrays in sent.items()
        ]
        saved = [slot for slot, _, new in plan if new]
        if saved and store.redline_digest() is None:
            store.record_redlines(stack.redline_digest)
        for slot, arrays, new in plan:
            if new:
                self._save(store, manifest, slot, arrays, stack)
        return saved

    def _check(
        self, store: SlotStore, manifest: SlotManifest, task: Task, slot: SlotId, arrays: Arrays
    ) -> bool:
        """Whether ``arrays`` are a new version to save; ManifestError when not vouched for."""
        name = str(slot)
        version = int(task.versions.get(name, 0))
        digest = manifest.check_arrays(name, version, arrays)
        if not store.versions(slot):
            return True
        info = store.record(slot)["info"]
        if info.get("run_id") != manifest.run_id:
            return True
        if int(info.get("round", 0)) > manifest.round:
            raise ManifestError(
                f"lf.manifest: slot {name}: expected a round >= {info.get('round')} "
                f"(saved already), got {manifest.round} (a replayed message)"
            )
        return bool(info.get("digest") != digest or int(info.get("version", -1)) != version)

    def _save(
        self,
        store: SlotStore,
        manifest: SlotManifest,
        slot: SlotId,
        arrays: Arrays,
        stack: LayerStack,
    ) -> None:
        entry = manifest.slots[str(slot)]
        info = {
            "run_id": manifest.run_id,
            "round": manifest.round,
            "version": entry.version,
            "digest": entry.digest,
            "server_key": manifest.keyid,
        }
        store.save(slot, arrays, stack.spec(slot), info)
        dropped = store.prune(slot, self.keep)
        log.info(
            "saved synced slot %s v%s (round %s)%s",
            slot,
            entry.version,
            manifest.round,
            f", pruned {dropped}" if dropped else "",
        )

    def status(self) -> list[SyncedSlot]:
        """The newest saved version of every synced slot, by slot name."""
        if not self.exists(self.root):
            return []
        store = self.store()
        out = []
        for name in sorted(store.manifest()["slots"]):
            slot = SlotId.parse(name)
            if not store.versions(slot):
                continue
            rec = store.record(slot)
            info = rec.get("info", {})
            out.append(
                SyncedSlot(
                    slot=name,
                    version=int(info.get("version", rec["version"])),
                    digest=str(info.get("digest", "")),
                    run_id=str(info.get("run_id", "")),
                    round=int(info.get("round", 0)),
                    saved_at=datetime.fromisoformat(str(rec["saved"])).timestamp(),
                    kept=len(store.versions(slot)),
                )
            )
        return out
