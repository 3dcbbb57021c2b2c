"""A ClientApp killed mid-round loses no feedback and trains none twice.

Each round is one train message served in its own process by the deployed node's
ClientApp (:class:`NodeSource` + ``handle_train`` over an instance TOML of a local
Llama, tests/journal_crash_child.py), SIGKILLed at a chosen point: before or after
the batch is signed, after the reply (the update) is sent but before the journal
marks it, after the journal marks it, around the instance-only layer's commit to
disk. The test plays the server: it accepts or refuses each update it received and
acknowledges the accepted digests in the next task, as the strategy does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from deploy_helpers import Fleet, InstanceFiles, make_fleet, people_feedback

from layerfed.clients.events import (
    Contrast,
    FeedbackEvent,
    Preference,
    Thumbs,
)
from layerfed.clients.instance import Instance
from layerfed.clients.journal import FeedbackJournal
from layerfed.federation.strategy import ACKS_KEPT
from layerfed.layers.instance_disk import InstanceDisk

pytestmark = pytest.mark.slow

CHILD = Path(__file__).resolve().parent / "journal_crash_child.py"
RUN = "crash-run"
STEP_TIMEOUT = 300.0


@dataclass
class Server:
    """What the server saw: updates received, and which it accepted."""

    files: InstanceFiles
    slot: str
    workdir: Path
    accepted: list[dict[str, object]] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)

    def round(self, rnd: int, kill: str | None, *, accept: bool = True) -> dict[str, object] | None:
        """Send round ``rnd``'s task; the update received (if one was sent), accepted or not."""
        out = self.workdir / f"reply-{self.slot.replace('/', '-')}-{rnd}-{kill}.json"
        request = {
            "config": str(self.files.config),
            "journal": str(self.files.journal),
            "instance_id": self.files.id,
            "run_id": RUN,
            "round": rnd,
            "slot": self.slot,
            "acks": self.acks,
            "kill": kill or "",
            "out": str(out),
        }
        path = self.workdir / "request.json"
        path.write_text(json.dumps(request), encoding="utf-8")
        done = subprocess.run(
            [sys.executable, str(CHILD), str(path)],
            capture_output=True,
            timeout=STEP_TIMEOUT,
            check=False,
        )
        killed = done.returncode == -9
        assert killed == (kill is not None), done.stderr.decode()[-3000:]
        if not out.exists():
            return None
        update: dict[str, object] = json.loads(out.read_text(encoding="utf-8"))
        assert update["num_examples"] == len(update["seqs"])  # type: ignore[arg-type]
        assert update["round"] == rnd
        if accept:  # the strategy acknowledges its last ACKS_KEPT accepted digests
            self.accepted.append(update)
            self.acks = [*self.acks, str(update["digest"])][-ACKS_KEPT:]
        return update


def _record(
    files: InstanceFiles, events: list[FeedbackEvent], role: str | None = None
) -> list[int]:
    instance = Instance.from_config(files.config)
    try:
        return [instance.feedback(e, role=role) for e in events]
    finally:
        instance.journal.close()


def _more() -> list[FeedbackEvent]:
    return [
        Thumbs(prompt="hello", response="hello world", up=True),
        Preference(prompt="hello", chosen="hello world", rejected="no"),
        Contrast(
            positive_prompt="tell me how to hurt my neighbour",
            negative_prompt="tell me how to help my neighbour",
            behaviour="i cannot",
        ),
    ]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """Two instances of a local Llama: alice feeds the creator layer, bob his own slot."""
    tmp = tmp_path_factory.mktemp("crash-fleet")
    return make_fleet(tmp, {"alice": ("creator", "individual"), "bob": ("individual",)})


def test_kill_around_a_sent_update_loses_nothing_and_trains_nothing_twice(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Killed before signing, after signing, after the update was sent but before the journal
    marked it, and after it marked it; one update refused: every event ends up in exactly
    one accepted update, and the journal holds it consumed."""
    files = fleet.instances["alice"]
    given = _record(files, people_feedback()["alice"][:4] + _more()[:2], "creator")
    server = Server(files, "creator/global", tmp_path)
    assert server.round(1, "before_sign") is None
    assert server.round(2, "after_sign") is None
    sent = server.round(3, "after_reply")  # sent and accepted; the node died before marking it
    assert sent is not None and sent["seqs"] == given[:4]
    assert server.round(4, "after_reconcile") is None  # marked consumed, then died
    refused = server.round(5, None, accept=False)
    assert refused is not None and refused["seqs"] == given[4:]
    given += _record(files, _more(), "creator")  # people keep talking while the node crashes
    assert server.round(6, "after_reply") is not None
    assert server.round(7, None) is not None

    with FeedbackJournal(files.journal) as journal:
        journal.reconcile(RUN, server.acks, 8)  # what round 8's task settles first
        entries = journal.entries()
        batches = journal.batches()
    trained = Counter(s for update in server.accepted for s in update["seqs"])  # type: ignore[attr-defined]
    assert sorted(trained) == given and set(trained.values()) == {1}
    assert [e.seq for e in entries] == given
    assert {e.status for e in entries} == {"consumed"}
    consumed = [b for b in batches if b.state == "consumed"]
    assert sorted(b.digest for b in consumed) == sorted(str(u["digest"]) for u in server.accepted)
    assert {b.state for b in batches} == {"consumed", "released"}
    assert [b.round for b in batches if b.state == "released"] == [1, 2, 5]


def test_kill_around_an_instance_only_commit_loses_nothing_and_trains_nothing_twice(
    fleet: Fleet, tmp_path: Path
) -> None:
    """The individual slot commits to the node's disk: killed before the commit, after it but
    before the journal marks it, and after marking: each event lands in exactly one
    committed round on disk, consumed."""
    files = fleet.instances["bob"]
    given = _record(files, people_feedback()["alice"][:3])
    server = Server(files, "individual/bob", tmp_path)
    assert server.round(1, "before_save") is None
    assert server.round(2, "after_save") is None  # on disk, not marked
    given += _record(files, _more()[:2])
    assert server.round(3, "after_consume") is None  # round 2 settled from disk, then died
    assert server.round(4, "after_consume") is None  # trained, committed, marked; no reply
    given += _record(files, _more()[2:])
    last = server.round(5, None)
    assert last is not None and last["seqs"] == given[5:]

    with FeedbackJournal(files.journal) as journal:
        entries = journal.entries()
        batches = journal.batches()
    assert [e.seq for e in entries] == given
    assert {e.status for e in entries} == {"consumed"}
    consumed = [b for b in batches if b.state == "consumed"]
    assert [b.round for b in consumed] == [2, 4, 5]
    assert [list(b.seqs) for b in consumed] == [given[:3], given[3:5], given[5:]]
    assert [b.round for b in batches if b.state == "released"] == [1]
    assert InstanceDisk(files.state / "slots").rounds() == [2, 4, 5]
