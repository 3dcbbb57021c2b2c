"""Crash and resume: SIGKILL the `layerfed simulate` process at ten points, resume each time.

Each start runs in its own process group, so killing the group kills Flower's
Ray processes too. Kill points are audit events (round start, a received
update, a commit, the end of a round, i.e. during its checkpoint), the
checkpoint files being written, a slot version being saved, and a plain delay,
each with a seeded random jitter. After one kill a torn half-record is left at
the end of the audit log, as a crash mid-write would. The final state must equal
an uninterrupted run's, with every round's updates accepted and committed
exactly once, and an intact audit chain that records the repair.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from layerfed.federation.server_state import ServerState
from layerfed.governance.audit import verify_audit
from layerfed.layers.slots import SlotId
from layerfed.simulation.server import gym_state
from layerfed.simulation.settings import SimSettings

pytestmark = pytest.mark.slow

CLI = "from layerfed.cli import main; main()"
ATTEMPT_TIMEOUT = 900.0  # a safety net for a hung run on a loaded machine, not a speed check
TORN = b'{"fields":{"round":1,"slot":"creator/gl'
PLAN: list[tuple[str, float]] = [
    ("delay", 6.0),
    ("update_received", 3),
    ("commit", 1),
    ("round_end", 1),
    ("checkpoint", 1),
    ("advanced", 1),
    ("slot_saved", 1),
    ("round_end", 1),
    ("advanced", 1),
    ("run_end", 1),
]
"""(trigger, n): kill after n seconds, or at the n-th such event of the round an attempt
redoes (``advanced``: its checkpoint is complete; ``checkpoint``: it is being written)."""
TEAR_AFTER = 2
"""Index in PLAN after whose kill a torn audit record is left behind."""


@dataclass
class Watch:
    """What one attempt has written so far: audit records, checkpoint files, slot manifest."""

    out: Path
    offset: int = 0
    start_round: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    manifest: float = 0.0

    def __post_init__(self) -> None:
        audit = self.out / "audit.jsonl"
        self.offset = audit.stat().st_size if audit.exists() else 0
        self.start_round = self.round()
        self.manifest = self._manifest_stamp()

    def round(self) -> int:
        """The last complete round according to ``state.json`` (0: none)."""
        try:
            return int(json.loads((self.out / "state" / "state.json").read_bytes())["round"])
        except (OSError, ValueError, KeyError):
            return 0

    def _manifest_stamp(self) -> float:
        path = self.out / "state" / "slots" / "manifest.json"
        return path.stat().st_mtime_ns if path.exists() else 0.0

    def count(self, trigger: str) -> int:
        """How many ``trigger`` events this attempt has produced in the round it redoes."""
        if trigger == "advanced":
            return int(self.round() > self.start_round)
        if trigger == "checkpoint":
            return int(self._writing_checkpoint() or self.round() > self.start_round)
        if trigger == "slot_saved":
            return int(self._manifest_stamp() != self.manifest)
        self._read_audit()
        return self.kinds[trigger]

    def _writing_checkpoint(self) -> bool:
        folders = [self.out, self.out / "state"]
        names = [p.name for d in folders if d.is_dir() for p in d.iterdir()]
        return any(n.startswith((".state.json.", ".metrics.json.")) for n in names)

    def _read_audit(self) -> None:
        audit = self.out / "audit.jsonl"
        if not audit.exists():
            return
        with open(audit, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            redone = record["fields"].get("round") == self.start_round + 1
            if redone or record["kind"] == "run_end":
                self.kinds[record["kind"]] += 1


def _start(out: Path, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-c", CLI, "simulate", "--out", str(out), "--resume"]
    with open(log, "ab") as sink:
        return subprocess.Popen(args, stdout=sink, stderr=sink, start_new_session=True)


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group we started (while it lives) and wait until none of it is left.

    A group id stays taken while any member lives, so a live group is still ours.
    """
    if proc.poll() is None or _group_alive(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    while _group_alive(proc.pid):
        assert time.monotonic() < deadline, f"processes of group {proc.pid} outlived SIGKILL"
        time.sleep(0.1)


def _attempt(out: Path, log: Path, trigger: str, n: float, jitter: float) -> str:
    """Start a resumed run and kill it at its trigger; say what happened."""
    watch = Watch(out)
    if watch.start_round >= SimSettings().resolved().rounds and trigger != "delay":
        trigger, n = "delay", 3.0 + 20 * jitter  # all rounds done: kill the idle restart
    proc = _start(out, log)
    started = time.monotonic()
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - started
            assert elapsed < ATTEMPT_TIMEOUT, f"attempt at {trigger} hung; see {log}"
            fired = elapsed >= n if trigger == "delay" else watch.count(trigger) >= n
            if fired:
                time.sleep(jitter)
                _kill_group(proc)
                where = f"round {watch.start_round} -> {watch.round()}"
                return f"killed at {trigger} #{n} (+{jitter * 1000:.0f} ms), {where}"
            time.sleep(0.002)
        return f"exited {proc.returncode} before {trigger} #{n}"
    finally:
        _kill_group(proc)


def _run(out: Path, log: Path) -> None:
    proc = _start(out, log)
    try:
        assert proc.wait(timeout=ATTEMPT_TIMEOUT) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        _kill_group(proc)


def _state(out: Path) -> ServerState:
    settings = SimSettings(out=str(out)).resolved()
    state = gym_state(settings)
    assert state.load()
    return state


def _records(out: Path) -> list[dict[str, Any]]:
    lines = (out / "audit.jsonl").read_bytes().splitlines()
    return [json.loads(line) for line in lines]


def _final_rounds(records: list[dict[str, Any]]) -> dict[int, dict[str, list[str]]]:
    """Per round, the commits and received digests of the last attempt at that round."""
    out: dict[int, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for record in records:
        kind, fields = record["kind"], record["fields"]
        if kind == "round_start":
            current = out[fields["round"]] = {"commit": [], "update_received": []}
        elif kind in ("policy_load", "round_end"):
            current = None
        elif current is not None and kind == "commit":
            current["commit"].append(fields["slot"])
        elif current is not None and kind == "update_received":
            current["update_received"].append(f"{fields['slot']}:{fields['digest']}")
    return out


def _metrics(state: ServerState) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k != "wall_s"} for m in state.metrics]


def test_sigkill_at_ten_points_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    """Ten SIGKILLs (one mid-checkpoint, one leaving a torn audit line) change nothing."""
    rng = random.Random(20251126)
    reference, crashed, log = tmp_path / "reference", tmp_path / "crashed", tmp_path / "run.log"
    _run(reference, log)
    history = []
    for index, (trigger, n) in enumerate(PLAN):
        jitter = 0.0 if trigger in ("round_end", "checkpoint") else rng.uniform(0.0, 0.3)
        history.append(_attempt(crashed, log, trigger, n, jitter))
        if index == TEAR_AFTER:
            with open(crashed / "audit.jsonl", "ab") as f:
                f.write(TORN)
    _run(crashed, log)
    print("\n".join(history))
    kills = [h for h in history if h.startswith("killed")]
    assert len(kills) == len(PLAN), history

    want, got = _state(reference), _state(crashed)
    assert got.round == want.round == SimSettings().resolved().rounds
    assert got.digest() == want.digest(), history
    assert _metrics(got) == _metrics(want)
    for name, entry in got.committed.items():
        assert entry["round"] == want.committed[name]["round"]
        assert (
            got.store.record(SlotId.parse(name), entry["version"])["info"]["round"]
            == entry["round"]
        )

    rounds_want, rounds_got = _final_rounds(_records(reference)), _final_rounds(_records(crashed))
    assert sorted(rounds_got) == sorted(rounds_want) == list(range(1, want.round + 1))
    for r, events in rounds_got.items():
        assert len(events["commit"]) == len(set(events["commit"])), (r, events)
        assert sorted(events["commit"]) == sorted(rounds_want[r]["commit"])
        assert sorted(events["update_received"]) == sorted(rounds_want[r]["update_received"])

    report = verify_audit(crashed / "audit.jsonl", anchor=got.audit_head)
    assert report.ok, report.reason
    records = _records(crashed)
    repairs = [r["fields"] for r in records if r["kind"] == "audit_repair"]
    assert len(repairs) == 1 and repairs[0]["cut_bytes"] == len(TORN)
    resumed = [r["fields"]["round"] for r in records if r["kind"] == "resume"]
    assert len(set(resumed)) >= 2, resumed  # resumed from at least two different checkpoints
