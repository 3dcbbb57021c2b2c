"""One ClientApp train message in its own process, killed (SIGKILL) at a chosen point.

Run by tests/test_journal_crash.py as ``python journal_crash_child.py REQUEST.json``.
The request names the instance TOML, the task (run id, round, slot, acks) and the
kill point; the process serves the message exactly as a deployed SuperNode's
ClientApp does (:class:`NodeSource` + :func:`handle_train`). An update counts as
*sent* once its reply is written to the request's ``out`` file (what the SuperNode
would push to the SuperLink); a kill point after that dies with the reply sent.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, Metadata, RecordDict

from layerfed.clients.client_app import handle_train
from layerfed.clients.config import InstanceConfig
from layerfed.clients.journal import FeedbackJournal
from layerfed.clients.node import NodeSource
from layerfed.governance.canonical import policy_hash
from layerfed.governance.envelope import envelope_from_dict
from layerfed.governance.signing import read_policy
from layerfed.layers.instance_disk import InstanceDisk
from layerfed.layers.slots import SlotId
from layerfed.wire.protocol import ENVELOPE, TASK, Task

KILL_POINTS = {
    # (class, method, before or after the original runs)
    "before_sign": (FeedbackJournal, "sign_batch", "before"),
    "after_sign": (FeedbackJournal, "sign_batch", "after"),
    "after_reconcile": (FeedbackJournal, "reconcile", "after"),
    "before_save": (InstanceDisk, "save", "before"),
    "after_save": (InstanceDisk, "save", "after"),
    "after_consume": (FeedbackJournal, "consume", "after"),
}
"""Where to die inside handle_train; ``after_reply`` dies once the reply is sent."""


def die() -> None:
    """SIGKILL this process: no cleanup, no flush, no atexit (a power cut for the journal)."""
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    """Make the named method kill the process before or after it runs."""
    owner, name, when = KILL_POINTS[point]
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when == "before":
            die()
        result = original(*args, **kwargs)
        die()
        return result

    setattr(owner, name, wrapper)


def train_message(task: Task) -> Message:
    """The train message a SuperLink delivers for ``task`` (no slot arrays: zeros or cache)."""
    metadata = Metadata(
        run_id=1,
        message_id=f"train-{task.round}",
        src_node_id=1,
        dst_node_id=2,
        reply_to_message_id="",
        group_id=str(task.round),
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    return Message(content=RecordDict({TASK: task.to_record()}), metadata=metadata)


def main(request_path: str) -> None:
    """Serve one train message as the request says; write the reply to ``out``."""
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    if request["kill"] in KILL_POINTS:
        arm(request["kill"])
    slot = SlotId.parse(request["slot"])
    task = Task(
        run_id=request["run_id"],
        round=request["round"],
        index=0,
        instance_id=request["instance_id"],
        layer=slot.layer,
        slot=slot,
        versions={},
        acks=tuple(request["acks"]),
        policy_hash=policy_hash(read_policy(InstanceConfig.load(request["config"]).policy)),
    )
    context = Context(
        run_id=1,
        node_id=2,
        node_config={"instance-config": request["config"]},
        state=RecordDict(),
        run_config={"layerfed-seed": 0},
    )
    reply = handle_train(train_message(task), context, NodeSource())
    envelope = envelope_from_dict(dict(reply.content.config_records[ENVELOPE].items()))
    with FeedbackJournal(request["journal"]) as journal:
        batch = next(  # this round's batch (an instance-only update's digest is that of no arrays)
            b
            for b in journal.batches()
            if (b.run_id, b.round, b.slot) == (task.run_id, task.round, str(slot))
            and b.state != "released"
        )
    assert batch.digest == envelope.ack_id
    sent = {
        "digest": envelope.ack_id,
        "num_examples": envelope.num_examples,
        "round": envelope.round,
        "seqs": list(batch.seqs),
    }
    Path(request["out"]).write_text(json.dumps(sent), encoding="utf-8")
    if request["kill"] == "after_reply":
        die()


if __name__ == "__main__":
    main(sys.argv[1])
