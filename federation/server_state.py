"""The server's committed state: slot versions, lazy decay, metrics, checkpoints.

A slot's value at round ``r`` is its committed arrays (from round ``s``) times
each memory's decay over ``r - s`` rounds, or over the wall-clock seconds since
the commit for a half-life given as a duration (each commit records its time),
so slots nobody touches cost nothing per round. After each round
:meth:`ServerState.checkpoint` writes ``state.json`` (round, slot versions and
times, audit head, metrics) atomically; slot files are written
before it, so a crash at any point resumes from the last complete round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from layerfed.errors import LayerfedError
from layerfed.governance.schema import Policy
from layerfed.federation.instance_disk import InstanceDisk
from layerfed.layers.memory import decay_arrays, seconds_between
from layerfed.layers.slots import SlotId, SlotSpec
from layerfed.layers.store import SlotStore, write_atomic

__all__ = ["ServerState", "StateError"]

log = logging.getLogger("layerfed")
STATE_FILE = "state.json"
METRICS_FILE = "metrics.json"
FORMAT = 1


class StateError(LayerfedError):
    """The checkpoint cannot be read or does not belong to this run."""


class ServerState:
    """Committed slots (by version and round), the last complete round, and metrics."""

    def __init__(
        self,
        out_dir: Path,
        policy: Policy,
        run_id: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.out_dir = out_dir
        self.clock = clock
        self.root = out_dir / "state"
        self.policy = policy
        self.run_id = run_id
        self.store = SlotStore(self.root / "slots")
        self.committed: dict[str, dict[str, float]] = {}  # version, round, time
        self.round = 0
        self.metrics: list[dict[str, Any]] = []
        self.audit_head = ""

    def version(self, slot: SlotId) -> int:
        """Committed version of ``slot`` (0: never committed, all zeros)."""
        return int(self.committed.get(str(slot), {}).get("version", 0))

    def current(self, slot: SlotId, spec: SlotSpec, round_: int) -> dict[str, np.ndarray[Any, Any]]:
        """The slot's arrays as they stand at ``round_`` and now (decay applied lazily).

        Round half-lives decay over the rounds since the commit, duration half-lives
        over the clock's seconds since it (none for a commit recorded without a time).
        """
        entry = self.committed.get(str(slot))
        if entry is None:
            return {n: np.zeros(s, dtype=np.float32) for n, s in spec.shapes().items()}
        arrays = self.store.load(slot, int(entry["version"]))
        layer = self.policy.layer(slot.layer)
        elapsed = max(0, round_ - int(entry["round"]))
        timed = any(m.half_life_seconds is not None for m in layer.memories)
        seconds = seconds_between(entry.get("time"), self.clock()) if timed else 0.0
        if elapsed == 0 and seconds == 0:
            return dict(arrays)
        return decay_arrays(arrays, layer, rounds=elapsed, seconds=seconds)

    def commit(
        self, slot: SlotId, arrays: dict[str, np.ndarray[Any, Any]], spec: SlotSpec, round_: int
    ) -> int:
        """Write a new version of ``slot`` as of ``round_`` and the clock's time now.

        It counts once checkpointed.
        """
        now = self.clock()
        info = {"round": round_, "run_id": self.run_id, "time": now}
        version = self.store.save(slot, arrays, spec, info)
        self.committed[str(slot)] = {"version": version, "round": round_, "time": now}
        return version

    def checkpoint(self, round_: int, audit_head: str, round_metrics: dict[str, Any]) -> None:
        """Make ``round_`` the last complete round: metrics and state, atomically."""
        self.round = round_
        self.audit_head = audit_head
        self.metrics = [m for m in self.metrics if m["round"] < round_] + [round_metrics]
        metrics = {"run_id": self.run_id, "rounds": self.metrics}
        write_atomic(self.out_dir / METRICS_FILE, _dumps(metrics))
        state = {
            "format": FORMAT,
            "run_id": self.run_id,
            "round": round_,
            "committed": self.committed,
            "audit_head": audit_head,
            "metrics": self.metrics,
        }
        write_atomic(self.root / STATE_FILE, _dumps(state))
        log.info("checkpointed round %s", round_)

    def load(self) -> bool:
        """Restore the last checkpoint of this run; False when there is none."""
        path = self.root / STATE_FILE
        if not path.exists():
            return False
        try:
            state = json.loads(path.read_bytes())
            if state["run_id"] != self.run_id or state["format"] != FORMAT:
                raise StateError(
                    f"{path}: expected a checkpoint of run {self.run_id!r}, got {state['run_id']!r}"
                )
            self.round = int(state["round"])
            self.committed = {str(k): dict(v) for k, v in state["committed"].items()}
            self.metrics = list(state["metrics"])
            self.audit_head = str(state["audit_head"])
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"{path}: expected a layerfed checkpoint, got {e}") from e
        return True

    def digest(self) -> str:
        """A digest of every committed slot, and of each instance's own slots on its disk.

        Two runs with the same seed reach the same digest, resumed or not.
        """
        h = hashlib.sha256()
        instances = self.root / "instances"
        if instances.is_dir():
            for folder in sorted(instances.iterdir()):
                disk = InstanceDisk(folder)
                saved = disk.load_before(self.round + 1)
                if saved is not None:
                    h.update(f"{folder.name}@{saved[0]}".encode())
                    for key in sorted(saved[1]):
                        h.update(key.encode())
                        h.update(np.ascontiguousarray(saved[1][key]).tobytes())
        for name in sorted(self.committed):
            slot = SlotId.parse(name)
            arrays = self.store.load(slot, int(self.committed[name]["version"]))
            for key in sorted(arrays):
                h.update(key.encode())
                h.update(np.ascontiguousarray(arrays[key]).tobytes())
        return h.hexdigest()


def _dumps(data: Any) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode("utf-8")
