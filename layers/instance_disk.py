"""An instance's own slots on its own disk, versioned by round.

Slots whose updates never leave the instance (the individual layer by default)
live here, not on the server. Each commit writes ``r{round:08d}.safetensors``
atomically, with the wall-clock time of the commit in the file's metadata
(``saved_at``, for memories whose half-life is a duration); training for round
``r`` starts from the newest file before ``r``, so a server that crashed and
replays round ``r`` gets the same result. Only the newest ``keep`` versions stay
on disk, and nothing stays in RAM between rounds.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from layerfed.atomic import atomic_path
from layerfed.layers.errors import SlotStoreError

__all__ = ["InstanceDisk"]

_NAME = re.compile(r"^r(\d{8})\.safetensors$")


class InstanceDisk:
    """Round-versioned arrays of one instance's own slots."""

    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = root
        self.keep = keep

    def rounds(self) -> list[int]:
        """Rounds with a committed file, oldest first."""
        if not self.root.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.root.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def load_before(self, round_: int) -> tuple[int, dict[str, np.ndarray[Any, Any]]] | None:
        """The newest committed arrays from a round before ``round_``, with that round."""
        earlier = [r for r in self.rounds() if r < round_]
        if not earlier:
            return None
        path = self.root / f"r{earlier[-1]:08d}.safetensors"
        try:
            return earlier[-1], dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise SlotStoreError(
                f"{path}: expected a safetensors file of slot arrays, got {e}"
            ) from e

    def saved_at(self, round_: int) -> float | None:
        """POSIX time at which round ``round_`` was committed; ``None`` for files without it."""
        path = self.root / f"r{round_:08d}.safetensors"
        try:
            with safe_open(str(path), framework="np") as handle:
                meta = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise SlotStoreError(
                f"{path}: expected a safetensors file of slot arrays, got {e}"
            ) from e
        text = meta.get("saved_at")
        if text is None:
            return None
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise SlotStoreError(f"{path}: metadata saved_at: expected a POSIX time, got {text!r}")
        return value

    def save(
        self, round_: int, arrays: dict[str, np.ndarray[Any, Any]], *, saved_at: float | None = None
    ) -> Path:
        """Atomically commit ``arrays`` as round ``round_`` (at ``saved_at``, default now).

        Old versions beyond ``keep`` are dropped.
        """
        when = time.time() if saved_at is None else saved_at
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"r{round_:08d}.safetensors"
        with atomic_path(final, mode=0o600) as tmp:
            save_file(
                {k: np.ascontiguousarray(v) for k, v in arrays.items()},
                tmp,
                metadata={"saved_at": repr(float(when))},
            )
        for old in self.rounds()[: -self.keep]:
            (self.root / f"r{old:08d}.safetensors").unlink(missing_ok=True)
        return final
