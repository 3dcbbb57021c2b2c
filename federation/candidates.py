"""Kept candidates: per round and slot, the aggregated mean the pipeline judged (for replay).

With the run setting ``keep_candidates`` (``layerfed-keep-candidates``) at N > 0, the
pipeline hands each slot's aggregated mean, after the aggregate stage and before the
judge, to a :class:`CandidateKeeper`. It writes one safetensors file per slot and
round under ``<out>/candidates/round-NNNNNN/`` and returns a ``candidate_kept``
audit event naming the file and the SHA-256 of its bytes, so the hash-chained (and
checkpoint-anchored) audit vouches for what the run judged. Rounds older than the
last N are deleted when a newer round is kept.

What is kept is the *mean* (the delta before ``server_lr``), with what the judge
read besides it as JSON metadata: the layer's ``server_lr``, the approvals gathered,
the known compositions' profiles, the server clock and the run's seed. Replay
(:mod:`layerfed.federation.replay`) recomputes the step under another policy's
``server_lr`` with the real step stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from layerfed.atomic import write_atomic
from layerfed.errors import LayerfedError
from layerfed.federation.events import Events, event
from layerfed.federation.server_state import ServerState
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.schema import Policy
from layerfed.layers.arrays import Arrays
from layerfed.layers.slots import SlotId

__all__ = [
    "CANDIDATES_DIR",
    "META_KEY",
    "CandidateError",
    "CandidateKeeper",
    "Kept",
    "KeptCandidate",
    "RoundView",
    "read_candidate",
]

log = logging.getLogger("layerfed")
CANDIDATES_DIR = "candidates"
META_KEY = "layerfed_candidate"
_ROUND_DIR = re.compile(r"^round-(\d{6})$")


class RoundView(Protocol):
    """What keeping reads of a round (a :class:`~layerfed.federation.round_context.RoundContext`)."""

    @property
    def policy(self) -> Policy:
        """The run's policy."""
        ...

    @property
    def run_id(self) -> str:
        """The run id."""
        ...

    @property
    def round(self) -> int:
        """The round."""
        ...

    @property
    def state(self) -> ServerState:
        """The server's state (its clock)."""
        ...

    @property
    def profiles(self) -> frozenset[tuple[str, tuple[str, ...]]]:
        """Known compositions' profiles."""
        ...


class CandidateError(LayerfedError):
    """A kept candidate is missing, unreadable or not the bytes the audit recorded."""


@dataclass(frozen=True)
class Kept:
    """What keeping one slot's mean produced: its ``candidate_kept`` audit event."""

    events: Events


@dataclass(frozen=True)
class KeptCandidate:
    """One kept candidate as read back: the mean and what the judge read besides it."""

    round: int
    slot: SlotId
    order: int
    """Position among the round's kept slots (the order the pipeline judged them in)."""
    mean: Arrays
    server_lr: float
    approvals: frozenset[str]
    profiles: frozenset[tuple[str, tuple[str, ...]]]
    time: float
    seed: int


class CandidateKeeper:
    """Writes kept candidates under ``out_dir/candidates`` and keeps the last ``rounds`` rounds."""

    def __init__(self, out_dir: Path, rounds: int, seed: int) -> None:
        if rounds < 1:
            raise ValueError(f"keep_candidates: expected at least 1 round, got {rounds}")
        self.out_dir, self.rounds, self.seed = out_dir, rounds, seed
        self.root = out_dir / CANDIDATES_DIR
        self._order: dict[int, int] = {}

    def keep(self, ctx: RoundView, slot: SlotId, mean: Arrays, approvals: Iterable[str]) -> Kept:
        """Write ``slot``'s mean of round ``ctx.round``; its digest goes to the audit."""
        round_ = ctx.round
        order = self._order.get(round_, 0)
        self._order = {round_: order + 1}
        if order == 0:
            self._prune(round_)
        meta = {
            "run_id": ctx.run_id,
            "round": round_,
            "slot": str(slot),
            "order": order,
            "server_lr": ctx.policy.layer(slot.layer).server_lr,
            "approvals": sorted(approvals),
            "profiles": sorted([j, list(g)] for j, g in ctx.profiles),
            "time": ctx.state.clock(),
            "seed": self.seed,
        }
        arrays = {k: np.ascontiguousarray(v) for k, v in sorted(mean.items())}
        data = st_save(arrays, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
        rel = Path(CANDIDATES_DIR, f"round-{round_:06d}", f"{order:04d}.safetensors")
        (self.out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out_dir / rel, data)
        digest = hashlib.sha256(data).hexdigest()
        kept = event(
            AuditKind.CANDIDATE_KEPT,
            round=round_,
            slot=str(slot),
            order=order,
            file=rel.as_posix(),
            sha256=digest,
            bytes=len(data),
            keep_rounds=self.rounds,
        )
        return Kept((kept,))

    def _prune(self, round_: int) -> None:
        """Delete kept rounds older than the last ``rounds`` (this one counted)."""
        if not self.root.is_dir():
            return
        for path in sorted(self.root.iterdir()):
            m = _ROUND_DIR.match(path.name)
            if m and int(m.group(1)) <= round_ - self.rounds:
                shutil.rmtree(path)
                log.info("dropped kept candidates of %s", path.name)


def read_candidate(path: Path, sha256: str) -> KeptCandidate:
    """Read one kept candidate, refusing bytes whose SHA-256 is not ``sha256`` (the audit's)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CandidateError(f"{path}: expected a kept candidate, got {e}") from e
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise CandidateError(
            f"{path}: expected the bytes the run judged (sha256 {sha256}), got sha256 {got}"
        )
    try:
        arrays = st_load(data)
        meta: Mapping[str, Any] = json.loads(_metadata(data)[META_KEY])
        return KeptCandidate(
            round=int(meta["round"]),
            slot=SlotId.parse(str(meta["slot"])),
            order=int(meta["order"]),
            mean=dict(arrays),
            server_lr=float(meta["server_lr"]),
            approvals=frozenset(str(a) for a in meta["approvals"]),
            profiles=frozenset((str(j), tuple(str(x) for x in g)) for j, g in meta["profiles"]),
            time=float(meta["time"]),
            seed=int(meta["seed"]),
        )
    except (KeyError, TypeError, ValueError, LayerfedError) as e:
        raise CandidateError(f"{path}: expected a kept candidate's metadata, got {e}") from e


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__``."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return dict(header.get("__metadata__", {}))
