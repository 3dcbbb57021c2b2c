"""What a finished run recorded, read back for replay: kept candidates and each one's outcome.

The run's ``audit.jsonl`` is verified (hash chain) and read once. A
``candidate_kept`` record names a kept file and the SHA-256 of its bytes; the
``veto``, ``red_line_breach`` and ``commit`` records of the same round and slot say
what the run decided. :func:`outcome_of` turns such records into an
:class:`Outcome`; replay applies the same function to the events the real judge
and commit stages return, so the recorded and the replayed decision are named by
one rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from layerfed.errors import LayerfedError
from layerfed.governance.audit import verify_audit
from layerfed.governance.audit_events import AuditKind

__all__ = [
    "Decision",
    "KeptRecord",
    "Outcome",
    "RecordedRun",
    "ReplayError",
    "outcome_of",
    "read_recorded",
]

Decision = Literal["committed", "clipped", "vetoed", "held", "red_line", "skipped", "error"]
"""What became of a slot's judged update: ``clipped`` commits a vetoed-down step;
``vetoed`` is a reject, ``held`` waits (quorum, probe hold), ``red_line`` a breach;
``skipped`` is a slot replay cannot judge (its layer is not in the policy), ``error``
a step that could not be applied."""
_JUDGED = {AuditKind.VETO.value, AuditKind.RED_LINE_BREACH.value, AuditKind.COMMIT.value}


class ReplayError(LayerfedError):
    """A run folder cannot be replayed (names the file, what was expected and got)."""


@dataclass(frozen=True)
class Outcome:
    """A decision, why (veto names and reasons, red-line breaches), and the version it made."""

    decision: Decision
    reasons: tuple[str, ...] = ()
    version: int | None = None
    vetoes: tuple[str, ...] = ()
    """Names of the vetoes that fired (``red_line`` for a breach)."""

    def as_json(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "decision": self.decision,
            "reasons": list(self.reasons),
            "version": self.version,
            "vetoes": list(self.vetoes),
        }


def outcome_of(records: Iterable[tuple[str, Mapping[str, Any]]]) -> Outcome:
    """The outcome ``(kind, fields)`` records of one slot update say (recorded or replayed)."""
    reasons: list[str] = []
    vetoes: list[str] = []
    actions: set[str] = set()
    version: int | None = None
    breach = False
    for kind, f in records:
        if kind == AuditKind.VETO.value:
            actions.add(str(f.get("action")))
            vetoes.append(str(f.get("veto")))
            reasons.append(f"{f.get('veto')} ({f.get('action')}): {f.get('reason')}")
        elif kind == AuditKind.RED_LINE_BREACH.value:
            breach = True
            vetoes.append("red_line")
            reasons.append(
                f"red line {f.get('suite')} on {'+'.join(f.get('composition', []))}: "
                f"rate {f.get('rate')} > {f.get('max_violation_rate')} "
                f"(committed {f.get('committed_rate')})"
            )
        elif kind == AuditKind.COMMIT.value:
            version = int(f["version"])
    decision: Decision
    if version is not None:
        decision = "clipped" if "clip" in actions else "committed"
    elif "reject" in actions:
        decision = "vetoed"
    elif "hold" in actions:
        decision = "held"
    elif breach:
        decision = "red_line"
    else:
        decision = "skipped"
    return Outcome(decision, tuple(reasons), version, tuple(vetoes))


@dataclass(frozen=True)
class KeptRecord:
    """One ``candidate_kept`` record: which round and slot, the file, its digest."""

    round: int
    slot: str
    order: int
    file: str
    sha256: str
    keep_rounds: int
    """The retention in force when it was kept (older rounds' files are deleted)."""


@dataclass
class RecordedRun:
    """A run's kept candidates, their recorded outcomes, and the versions it committed."""

    run_dir: Path
    run_id: str
    kept: list[KeptRecord] = field(default_factory=list)
    judged: dict[tuple[int, str], list[tuple[str, Mapping[str, Any]]]] = field(default_factory=dict)
    commits: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """Slot -> (round, version) of every commit, in order."""
    last_round: int = 0

    def outcome(self, round_: int, slot: str) -> Outcome:
        """What the run decided for ``slot`` in ``round_``."""
        return outcome_of(self.judged.get((round_, slot), []))

    def version_before(self, slot: str, round_: int) -> int:
        """The slot's committed version before ``round_`` (0: none)."""
        return max((v for r, v in self.commits.get(slot, []) if r < round_), default=0)


def read_recorded(run_dir: Path) -> RecordedRun:
    """Verify ``run_dir/audit.jsonl`` and read what replay needs from it."""
    path = run_dir / "audit.jsonl"
    if not path.is_file():
        raise ReplayError(f"{path}: expected a run's audit log, got no such file")
    report = verify_audit(path)
    if not report.ok and not report.torn_tail:
        raise ReplayError(f"{path}:{report.first_broken_line}: {report.reason}")
    run = RecordedRun(run_dir, "")
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                break  # a torn last line (verified above): nothing after it
            _read_one(run, str(record.get("kind")), record.get("fields") or {})
    if run.kept:  # drop what retention deleted: rounds older than the last kept ones
        latest = max(k.round for k in run.kept)
        run.kept = [k for k in run.kept if k.round > latest - run.kept[-1].keep_rounds]
    else:
        raise ReplayError(
            f"{path}: expected candidate_kept records, got none "
            "(run with keep_candidates > 0: `layerfed simulate --keep-candidates N` "
            "or run config layerfed-keep-candidates)"
        )
    return run


def _read_one(run: RecordedRun, kind: str, f: Mapping[str, Any]) -> None:
    if kind == AuditKind.POLICY_LOAD.value and f.get("run_id"):
        run.run_id = str(f["run_id"])
    elif kind == AuditKind.CANDIDATE_KEPT.value:
        run.kept = [k for k in run.kept if (k.round, k.slot) != (f["round"], f["slot"])]
        run.kept.append(
            KeptRecord(
                int(f["round"]),
                str(f["slot"]),
                int(f["order"]),
                str(f["file"]),
                str(f["sha256"]),
                int(f["keep_rounds"]),
            )
        )
        run.judged[(int(f["round"]), str(f["slot"]))] = []  # a resumed round starts over
    elif kind in _JUDGED and "slot" in f:
        run.judged.setdefault((int(f["round"]), str(f["slot"])), []).append((kind, f))
        if kind == AuditKind.COMMIT.value:
            run.commits.setdefault(str(f["slot"]), []).append((int(f["round"]), int(f["version"])))
    elif kind == AuditKind.ROUND_END.value:
        run.last_round = max(run.last_round, int(f["round"]))
