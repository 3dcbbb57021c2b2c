"""The feedback journal: durability across crashes, the batch life cycle, bad files."""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from layerfed.clients.events import FeedbackEvent, Thumbs, parse_event
from layerfed.clients.journal import Batch, FeedbackJournal, JournalError
from layerfed.errors import LayerfedError

VALID: list[dict[str, Any]] = [
    {"kind": "thumbs", "prompt": "p", "response": "r", "up": True},
    {"kind": "preference", "prompt": "p", "chosen": "a", "rejected": "b"},
    {
        "kind": "marks",
        "prompt": "p",
        "response": "abc",
        "spans": [{"start": 0, "end": 1, "valence": 1}],
    },
    {"kind": "redo", "prompt": "p", "original": "a b", "corrected": "a c", "first_wrong_token": 1},
    {
        "kind": "alternative",
        "prompt": "p",
        "response": "r s",
        "position": 1,
        "chosen_token": 7,
        "candidates": [5, 7],
        "response_ids": [4, 5],
    },
    {"kind": "contrast", "positive_prompt": "a", "negative_prompt": "b", "behaviour": "c"},
]


def thumbs(i: int) -> FeedbackEvent:
    return Thumbs(prompt="p", response=f"r{i}", up=i % 2 == 0)


def fill(journal: FeedbackJournal, n: int) -> list[int]:
    return journal.append_many([thumbs(i) for i in range(n)])


def test_every_event_kind_round_trips(tmp_path: Path) -> None:
    """Each kind's JSON dump parses back equal, and survives the journal and a reopen unchanged."""
    events = [parse_event(data) for data in VALID]
    for event in events:
        assert parse_event(event.model_dump(mode="json")) == event
    path = tmp_path / "j.db"
    with FeedbackJournal(path) as journal:
        assert [journal.append(e) for e in events] == list(range(1, len(events) + 1))
    with FeedbackJournal(path) as journal:
        got = journal.entries()
    assert [entry.event for entry in got] == events
    assert [type(entry.event) for entry in got] == [type(e) for e in events]
    assert all(entry.status == "pending" and entry.batch is None for entry in got)


def test_file_is_wal_with_a_schema_version(tmp_path: Path) -> None:
    """A new journal file is in WAL mode, carries user_version 1 and stores events as JSON."""
    path = tmp_path / "j.db"
    with FeedbackJournal(path) as journal:
        journal.append(thumbs(0))
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        kind, body = db.execute("SELECT kind, body FROM events").fetchone()
    finally:
        db.close()
    assert kind == "thumbs"
    assert '"response":"r0"' in body


def test_a_second_journal_on_the_same_file_sees_appends(tmp_path: Path) -> None:
    """Another connection (e.g. a web page's process) reads what one journal committed."""
    path = tmp_path / "j.db"
    with FeedbackJournal(path) as writer, FeedbackJournal(path) as reader:
        fill(writer, 3)
        batch = writer.open_batch("run", 1, "individual", limit=2)
        assert reader.counts() == {"pending": 1, "batched": 2, "consumed": 0}
        assert reader.batches() == [batch]


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _crash_after(path: Path, steps: Callable[[FeedbackJournal], object], how: str) -> int:
    """Run ``steps`` on the journal in a forked child that then dies without clean-up
    (``os._exit`` or ``SIGKILL``); return the child's wait status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            steps(FeedbackJournal(path))
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def _events(start: int, stop: int) -> list[FeedbackEvent]:
    return [Thumbs(prompt="p", response=f"r{i}", up=True) for i in range(start, stop)]


@needs_fork
def test_appends_survive_sigkill_right_after_append_returns(tmp_path: Path) -> None:
    """A process killed (SIGKILL, no clean-up) right after append returns loses none of its events."""
    path = tmp_path / "j.db"

    def steps(j: FeedbackJournal) -> None:
        for event in _events(0, 50):
            j.append(event)
        j.append_many(_events(50, 60))

    status = _crash_after(path, steps, "kill")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    with FeedbackJournal(path) as journal:
        entries = journal.entries()
    assert [e.seq for e in entries] == list(range(1, 61))
    assert [e.event for e in entries] == _events(0, 60)


@needs_fork
def test_kill_at_a_random_moment_keeps_every_returned_append(tmp_path: Path) -> None:
    """SIGKILL while a process appends in a loop: every seq it reported is there, with no gaps."""
    path = tmp_path / "j.db"
    FeedbackJournal(path).close()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child appends until killed
        os.close(read_end)
        try:
            j = FeedbackJournal(path)
            for i in itertools.count():
                os.write(write_end, f"{j.append(thumbs(i))}\n".encode())
        finally:
            os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end) as lines:
        reported = [int(lines.readline()) for _ in range(40)]
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with FeedbackJournal(path) as journal:
        seqs = [e.seq for e in journal.entries()]
    assert seqs == list(range(1, len(seqs) + 1))
    assert set(reported) <= set(seqs)


def _open(j: FeedbackJournal) -> Batch:
    return j.open_batch("run", 3, "individual", limit=4)


def _sign(j: FeedbackJournal) -> Batch:
    batch = _open(j)
    j.sign_batch(batch.id, "d3")
    return batch


CRASH_POINTS: dict[str, Callable[[FeedbackJournal], object]] = {
    "after_open": _open,
    "after_sign": _sign,
    "after_consume": lambda j: j.consume(_sign(j).id),
}


@needs_fork
@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
@pytest.mark.parametrize("server_accepted", [True, False])
def test_crash_in_the_batch_life_cycle_loses_and_doubles_nothing(
    tmp_path: Path, point: str, server_accepted: bool
) -> None:
    """Killed after open/sign/consume, then reopened and reconciled: no event lost, none in two
    batches, none consumed twice; a signed batch is consumed iff the server accepted its digest."""
    path = tmp_path / "j.db"
    with FeedbackJournal(path) as journal:
        fill(journal, 6)
    status = _crash_after(path, CRASH_POINTS[point], "exit")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    with FeedbackJournal(path) as journal:
        accepted = {"d3"} if server_accepted else set()
        consumed, released = journal.reconcile("run", accepted, before_round=4)
        # A replay of the next round must not take the settled events twice.
        journal.open_batch("run", 4, "individual")
        check_invariants(journal)
        counts = journal.counts()
    consumed_expected = point == "after_consume" or (point == "after_sign" and server_accepted)
    assert counts["consumed"] == (4 if consumed_expected else 0)
    assert counts["batched"] == 6 - counts["consumed"]
    live_before = point != "after_consume"
    assert (consumed, released) == (
        (int(consumed_expected), int(not consumed_expected)) if live_before else (0, 0)
    )


def check_invariants(journal: FeedbackJournal) -> None:
    """Every seq is in exactly one of pending / one live batch / consumed (in one consumed batch)."""
    entries = journal.entries()
    batches = {b.id: b for b in journal.batches()}
    pending = [e.seq for e in journal.pending()]
    assert pending == sorted(pending)
    assert pending == [e.seq for e in entries if e.status == "pending"]
    for state in ("open", "consumed"):
        holders: dict[int, str] = {}
        for b in batches.values():
            if b.state in (("open", "signed") if state == "open" else ("consumed",)):
                for seq in b.seqs:
                    assert seq not in holders, f"seq {seq} in {holders[seq]} and {b.id}"
                    holders[seq] = b.id
        for e in entries:
            in_state = e.status == ("batched" if state == "open" else "consumed")
            assert (e.seq in holders) == in_state
            if in_state:
                assert e.batch == holders[e.seq]
                assert (e.run_id, e.round) == (batches[e.batch].run_id, batches[e.batch].round)
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)
    total = journal.counts()
    assert sum(total.values()) == len(entries)


def test_open_batch_is_idempotent_per_run_round_slot() -> None:
    """Reopening a live (run, round, slot) returns the same batch; other slots take other events."""
    with FeedbackJournal(None) as journal:
        fill(journal, 5)
        first = journal.open_batch("run", 1, "individual", limit=2)
        assert first.seqs == (1, 2)
        fill(journal, 1)
        assert journal.open_batch("run", 1, "individual", limit=4) == first
        journal.sign_batch(first.id, "d")
        again = journal.open_batch("run", 1, "individual")
        assert (again.id, again.seqs, again.state, again.digest) == (
            first.id,
            (1, 2),
            "signed",
            "d",
        )
        other = journal.open_batch("run", 1, "community", limit=2)
        assert other.seqs == (3, 4)
        journal.consume(first.id)
        fresh = journal.open_batch("run", 1, "individual")
        assert fresh.id != first.id
        assert fresh.seqs == (5, 6)


def test_release_returns_events_to_pending_in_seq_order() -> None:
    """Released events are pending again, in their original seq order among later appends."""
    with FeedbackJournal(None) as journal:
        fill(journal, 4)
        batch = journal.open_batch("run", 1, "individual", limit=3)
        fill(journal, 2)
        assert [e.seq for e in journal.pending()] == [4, 5, 6]
        journal.release(batch.id)
        journal.release(batch.id)  # idempotent
        assert [e.seq for e in journal.pending()] == [1, 2, 3, 4, 5, 6]
        assert [e.seq for e in journal.pending(limit=2)] == [1, 2]
        assert journal.batches()[0].state == "released"
        assert journal.batches()[0].seqs == (1, 2, 3)
        assert journal.open_batch("run", 1, "individual", limit=2).seqs == (1, 2)


def test_consumed_never_goes_back_and_bad_calls_are_typed() -> None:
    """Consume is idempotent; releasing a consumed batch, consuming a released one, signing a
    closed one, an unknown batch id, an empty digest or a negative limit raise JournalError."""
    with FeedbackJournal(None) as journal:
        fill(journal, 4)
        a = journal.open_batch("run", 1, "s", limit=2)
        b = journal.open_batch("run", 1, "t", limit=2)
        journal.consume(a.id)
        journal.consume(a.id)
        journal.release(b.id)
        for call in (
            lambda: journal.release(a.id),
            lambda: journal.consume(b.id),
            lambda: journal.sign_batch(a.id, "d"),
            lambda: journal.sign_batch("nope", "d"),
            lambda: journal.consume("nope"),
            lambda: journal.sign_batch(b.id, ""),
            lambda: journal.pending(limit=-1),
        ):
            with pytest.raises(JournalError):
                call()
        assert journal.counts() == {"pending": 2, "batched": 0, "consumed": 2}


def test_reconcile_consumes_accepted_and_releases_the_rest() -> None:
    """reconcile: earlier rounds of the run are consumed if any digest was accepted, else released;
    the current round is left alone; other runs' live batches are released."""
    with FeedbackJournal(None) as journal:
        fill(journal, 8)
        accepted = journal.open_batch("run", 1, "s", limit=2)
        journal.sign_batch(accepted.id, "old")
        journal.sign_batch(accepted.id, "new")  # a replay re-signed it: either digest counts
        refused = journal.open_batch("run", 2, "s", limit=2)
        journal.sign_batch(refused.id, "x")
        unsigned = journal.open_batch("run", 2, "t", limit=1)
        current = journal.open_batch("run", 3, "s", limit=1)
        stale = journal.open_batch("old-run", 9, "s", limit=1)
        assert journal.reconcile("run", ["old", "y"], before_round=3) == (1, 3)
        states = {b.id: b.state for b in journal.batches()}
        assert states == {
            accepted.id: "consumed",
            refused.id: "released",
            unsigned.id: "released",
            current.id: "open",
            stale.id: "released",
        }
        assert journal.reconcile("run", ["old"], before_round=3) == (0, 0)
        assert [e.seq for e in journal.pending()] == [3, 4, 5, 7, 8]
        check_invariants(journal)


def test_concurrent_appends_while_batches_open() -> None:
    """A thread appending while another opens and consumes batches loses and doubles nothing."""
    journal = FeedbackJournal(None)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(300):
                journal.append(thumbs(i))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    taken: list[int] = []
    round_ = 0
    while thread.is_alive() or journal.counts()["pending"]:
        batch = journal.open_batch("run", round_, "individual", limit=7)
        taken.extend(batch.seqs)
        journal.consume(batch.id)
        round_ += 1
    thread.join()
    assert not errors
    assert taken == list(range(1, 301))
    check_invariants(journal)
    journal.close()


def test_a_row_that_no_longer_parses_names_its_seq(tmp_path: Path) -> None:
    """A stored event that no longer parses is quarantined naming its seq, not dropped (issue 24)."""
    path = tmp_path / "j.db"
    with FeedbackJournal(path) as journal:
        fill(journal, 3)
    db = sqlite3.connect(path)
    db.execute("""UPDATE events SET body = '{"kind":"mystery"}' WHERE seq = 2""")
    db.commit()
    db.close()
    with FeedbackJournal(path) as journal:
        assert [e.seq for e in journal.entries()] == [1, 3]
        (bad,) = journal.quarantined()
        assert bad.seq == 2 and "seq 2" in bad.reason and bad.body == '{"kind":"mystery"}'


def _newer(path: Path) -> None:
    FeedbackJournal(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()


def _foreign(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t(x)")
    db.close()


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p.write_bytes(b"not a database at all " * 100), "not a database"),
        (_foreign, "another SQLite database"),
        (_newer, "schema version"),
        (lambda p: None, "existing folder"),
    ],
    ids=["garbage", "foreign", "newer", "no-folder"],
)
def test_bad_files_raise_journal_error_naming_the_file(
    tmp_path: Path, make: Any, says: str
) -> None:
    """Garbage, another SQLite database, a newer schema or a missing folder: JournalError, with
    the file's path in the message (never a raw sqlite3 error)."""
    path = tmp_path / "j.db" if says != "existing folder" else tmp_path / "missing" / "j.db"
    make(path)
    with pytest.raises(JournalError) as err:
        FeedbackJournal(path)
    assert str(path) in str(err.value)
    assert says in str(err.value)
    assert isinstance(err.value, LayerfedError)


def test_a_thousand_appends_are_fast(tmp_path: Path) -> None:
    """1,000 single fsynced appends take well under a few seconds; append_many is one commit."""
    with FeedbackJournal(tmp_path / "j.db") as journal:
        start = time.perf_counter()
        for i in range(1000):
            journal.append(thumbs(i))
        assert time.perf_counter() - start < 10.0
        start = time.perf_counter()
        assert journal.append_many([thumbs(i) for i in range(1000)]) == list(range(1001, 2001))
        assert time.perf_counter() - start < 2.0


class JournalMachine(RuleBasedStateMachine):
    """Random append/open/sign/consume/release/reconcile sequences keep the journal's invariants."""

    live = Bundle("live")

    @initialize()
    def start(self) -> None:
        self.journal = FeedbackJournal(None)
        self.appended = 0
        self.consumed: set[int] = set()
        self.digests: list[str] = []

    @rule(n=st.integers(1, 4))
    def append(self, n: int) -> None:
        seqs = self.journal.append_many([thumbs(self.appended + i) for i in range(n)])
        assert seqs == list(range(self.appended + 1, self.appended + n + 1))
        self.appended += n

    @rule(
        target=live,
        run=st.sampled_from(["a", "b"]),
        rnd=st.integers(0, 3),
        slot=st.sampled_from(["s", "t"]),
        limit=st.none() | st.integers(0, 5),
    )
    def open_batch(self, run: str, rnd: int, slot: str, limit: int | None) -> Batch:
        before = {b.id: b for b in self.journal.batches() if b.state in ("open", "signed")}
        batch = self.journal.open_batch(run, rnd, slot, limit)
        same = [b for b in before.values() if (b.run_id, b.round, b.slot) == (run, rnd, slot)]
        if same:
            assert batch == same[0]
        else:
            assert batch.state == "open"
            assert limit is None or len(batch.seqs) <= limit
        return batch

    @rule(batch=live, digest=st.sampled_from(["d1", "d2", "d3"]))
    def sign(self, batch: Batch, digest: str) -> None:
        if self._state(batch) in ("open", "signed"):
            self.journal.sign_batch(batch.id, digest)
            self.digests.append(digest)

    @rule(batch=consumes(live))
    def consume(self, batch: Batch) -> None:
        if self._state(batch) != "released":
            self.journal.consume(batch.id)
            self.consumed |= set(batch.seqs)

    @rule(batch=consumes(live))
    def release(self, batch: Batch) -> None:
        if self._state(batch) != "consumed":
            self.journal.release(batch.id)

    @rule(
        run=st.sampled_from(["a", "b"]),
        accepted=st.sets(st.sampled_from(["d1", "d2", "d3"])),
        before=st.integers(0, 4),
    )
    def reconcile(self, run: str, accepted: set[str], before: int) -> None:
        self.journal.reconcile(run, accepted, before)
        left = [b for b in self.journal.batches() if b.state in ("open", "signed")]
        assert all(b.run_id == run and b.round >= before for b in left)

    def _state(self, batch: Batch) -> str:
        return next(b.state for b in self.journal.batches() if b.id == batch.id)

    @invariant()
    def holds(self) -> None:
        check_invariants(self.journal)
        entries = self.journal.entries()
        assert [e.seq for e in entries] == list(range(1, self.appended + 1))
        now = {e.seq for e in entries if e.status == "consumed"}
        assert self.consumed <= now  # consumed never goes back
        self.consumed = now

    def teardown(self) -> None:
        self.journal.close()


TestJournalMachine = JournalMachine.TestCase
TestJournalMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def corrupt(path: Path, seq: int, body: str = '{"kind": "thumbs", "prompt": ') -> None:
    """Overwrite the stored body of event ``seq`` behind the journal's back."""
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE events SET body = ? WHERE seq = ?", (body, seq))
    db.close()


def test_a_row_that_no_longer_parses_is_quarantined_and_the_rest_trains(tmp_path: Path) -> None:
    """One unparsable stored body no longer stops pending(), entries() or open_batch():
    the row is kept, listed by quarantined() with its reason, and never batched."""
    path = tmp_path / "journal.sqlite"
    with FeedbackJournal(path) as journal:
        fill(journal, 4)
    corrupt(path, 2)
    corrupt(path, 3, '{"kind": "hug"}')
    with FeedbackJournal(path) as journal:
        assert [e.seq for e in journal.pending()] == [1, 4]
        assert [e.seq for e in journal.entries()] == [1, 4]
        batch = journal.open_batch("run", 1, "individual/alice")
        assert batch.seqs == (1, 4) and len(batch.events) == 2
        journal.consume(batch.id)
        bad = journal.quarantined()
        assert [q.seq for q in bad] == [2, 3]
        assert all(q.reason and "seq" in q.reason for q in bad) and "hug" in bad[1].reason
        assert bad[0].body == '{"kind": "thumbs", "prompt": ' and bad[1].kind == "thumbs"
        assert journal.pending() == [] and journal.open_batch("run", 2, "x").seqs == ()
    with FeedbackJournal(path) as journal:  # kept, not deleted, across reopening
        assert [q.seq for q in journal.quarantined()] == [2, 3]
        assert sqlite3.connect(path).execute("SELECT count(*) FROM events").fetchone()[0] == 4


def test_a_batched_row_that_no_longer_parses_does_not_break_batches(tmp_path: Path) -> None:
    """A row that goes bad inside a live batch is left out of it (and quarantined);
    batches() and the idempotent open_batch() replay still answer."""
    path = tmp_path / "journal.sqlite"
    with FeedbackJournal(path) as journal:
        fill(journal, 3)
        first = journal.open_batch("run", 1, "s")
    corrupt(path, 1)
    with FeedbackJournal(path) as journal:
        again = journal.open_batch("run", 1, "s")
        assert again.id == first.id and again.seqs == (2, 3)
        assert [b.seqs for b in journal.batches()] == [(2, 3)]
        assert [q.seq for q in journal.quarantined()] == [1]
