"""Committed shared slot versions reach the instance: verified, saved, composed, pruned.

A deployed node (NodeSource) gets a ``train`` message carrying creator/global arrays
and the manifest the server signed; it saves them under ``<state>/synced`` and a fresh
``Instance.from_config`` composes them. Tampered bytes, an unsigned manifest and one
signed by another key are refused with ManifestError, keeping the saved version.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from deploy_helpers import Fleet, make_fleet
from flwr.app import Context, Message, RecordDict
from journal_crash_child import train_message
from typer.testing import CliRunner

from layerfed.cli import app
from layerfed.clients.client_app import handle_train
from layerfed.clients.config import InstanceConfig
from layerfed.clients.instance import Instance
from layerfed.clients.node import NodeSource
from layerfed.clients.source import NodeRuntime
from layerfed.clients.synced import SYNCED_DIR, SyncedSlots
from layerfed.governance.canonical import arrays_digest, policy_hash
from layerfed.governance.keys import load_private_key
from layerfed.governance.signing import read_policy
from layerfed.layers.arrays import Arrays
from layerfed.layers.slots import SlotId
from layerfed.wire.manifest import (
    MANIFEST,
    ManifestError,
    SlotManifest,
    SlotVersion,
    sign_manifest,
)
from layerfed.wire.protocol import Task, arrays_to_record, slot_record_name

RUN = "sync-run"
CREATOR = SlotId("creator", "global")


@dataclass
class Node:
    """Alice's deployed node: its config, source, context, runtime and the server's key."""

    fleet: Fleet
    config: Path
    source: NodeSource
    context: Context
    rt: NodeRuntime
    server: Ed25519PrivateKey

    @property
    def state(self) -> Path:
        """Alice's ``[storage] state``."""
        return self.config.parent / "data" / "state"

    def synced(self, keep: int = 3) -> SyncedSlots:
        """Alice's synced store as the node opens it."""
        return SyncedSlots(self.state / SYNCED_DIR, self.server.public_key(), keep)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """Alice (creator + individual) on a local Llama, trusting the run's server key."""
    fleet = make_fleet(tmp_path_factory.mktemp("sync"), {"alice": ("creator", "individual")})
    config = fleet.instances["alice"].config
    pub = fleet.server_key.with_name("server.pub.pem")
    with config.open("a", encoding="utf-8") as f:
        f.write(f'\n[sync]\nserver_key = "{pub}"\nkeep = 2\n')
    source = NodeSource()
    context = _context(config)
    rt = source.runtime(train_message(_task(0, {})), context)
    yield Node(fleet, config, source, context, rt, load_private_key(fleet.server_key))


@pytest.fixture
def fresh(node: Node) -> Iterator[Node]:
    """The node with nothing synced yet (each test starts from v0)."""
    shutil.rmtree(node.state / SYNCED_DIR, ignore_errors=True)
    node.context = _context(node.config)
    yield node


def _context(config: Path) -> Context:
    return Context(
        run_id=1,
        node_id=2,
        node_config={"instance-config": str(config)},
        state=RecordDict(),
        run_config={"layerfed-seed": 0},
    )


def _task(round_: int, versions: dict[str, int], config: Path | None = None) -> Task:
    digest = policy_hash(read_policy(InstanceConfig.load(config).policy)) if config else ""
    return Task(RUN, round_, 0, "alice", "individual", SlotId("individual", "alice"), versions,
                policy_hash=digest)  # fmt: skip


def _arrays(rt: NodeRuntime, value: float) -> Arrays:
    rng = np.random.default_rng(int(value * 1000))
    return {
        name: (value * rng.standard_normal(a.shape)).astype(np.float32)
        for name, a in rt.zeros(CREATOR).items()
    }


def _message(
    node: Node,
    round_: int,
    version: int,
    arrays: Arrays,
    *,
    signed: Arrays | None = None,
    key: Ed25519PrivateKey | None = None,
    manifest: bool = True,
) -> Message:
    """A train message sending creator/global ``arrays`` as ``version``, with a manifest
    over ``signed`` (default: the arrays sent) by ``key`` (default: the server's)."""
    task = _task(round_, {str(CREATOR): version}, node.config)
    msg = train_message(task)
    msg.content[slot_record_name(CREATOR)] = arrays_to_record(arrays)
    if manifest:
        entry = SlotVersion(version, arrays_digest(signed if signed is not None else arrays))
        body = SlotManifest(RUN, round_, "alice", {str(CREATOR): entry})
        msg.content[MANIFEST] = sign_manifest(body, key or node.server)
    return msg


def _logits(inst: Instance) -> torch.Tensor:
    ids = inst.tokenizer("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        out: torch.Tensor = inst.model(ids).logits
    return out


def test_a_rounds_slots_are_saved_and_a_fresh_instance_composes_them(fresh: Node) -> None:
    """The slots a round sends are saved under <state>/synced; Instance.from_config composes
    them (the server's version, logits differ from v0) and `instance status` prints them."""
    before = Instance.from_config(fresh.config)
    assert before.versions[str(CREATOR)] == 0
    v0 = _logits(before)
    before.journal.close()
    arrays = _arrays(fresh.rt, 0.5)
    handle_train(_message(fresh, 1, 1, arrays), fresh.context, fresh.source)
    rows = fresh.synced().status()
    assert [(r.slot, r.version, r.round) for r in rows] == [(str(CREATOR), 1, 1)]
    assert rows[0].digest == arrays_digest(arrays)
    after = Instance.from_config(fresh.config)
    try:
        assert after.versions[str(CREATOR)] == 1
        assert not torch.allclose(_logits(after), v0)
    finally:
        after.journal.close()
    result = CliRunner().invoke(app, ["instance", "status", "--config", str(fresh.config)])
    assert result.exit_code == 0, result.output
    assert str(CREATOR) in result.output and arrays_digest(arrays) in result.output


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        ("bytes", "digest"),
        ("unsigned", "got none"),
        ("other_key", "trusted server key"),
        ("edited_manifest", "signature"),
        ("other_round", "round, instance"),
    ],
)
def test_a_tampered_synced_slot_is_refused_and_the_old_version_kept(
    fresh: Node, tamper: str, match: str
) -> None:
    """Changed bytes, no manifest, another key, an edited manifest or another round's
    manifest raise ManifestError naming the problem; v1 stays saved and nothing is cached."""
    v1 = _arrays(fresh.rt, 0.5)
    handle_train(_message(fresh, 1, 1, v1), fresh.context, fresh.source)
    v2 = _arrays(fresh.rt, 0.7)
    if tamper == "bytes":
        changed = {k: v.copy() for k, v in v2.items()}
        next(iter(changed.values())).flat[0] += 1.0
        msg = _message(fresh, 2, 2, changed, signed=v2)
    elif tamper == "unsigned":
        msg = _message(fresh, 2, 2, v2, manifest=False)
    elif tamper == "other_key":
        msg = _message(fresh, 2, 2, v2, key=Ed25519PrivateKey.generate())
    elif tamper == "edited_manifest":
        msg = _message(fresh, 2, 2, v2)
        record = msg.content.config_records[MANIFEST]
        record["payload"] = str(record["payload"]).replace('"version":2', '"version":3')
    else:
        msg = _message(fresh, 2, 2, v2)
        msg.content[MANIFEST] = _message(fresh, 1, 2, v2).content.config_records[MANIFEST]
    with pytest.raises(ManifestError, match=match):
        handle_train(msg, fresh.context, fresh.source)
    rows = fresh.synced().status()
    assert [(r.version, r.digest) for r in rows] == [(1, arrays_digest(v1))]
    cached = fresh.context.state.config_records["lf.versions"]
    assert cached[str(CREATOR)] == 1


def test_retention_prunes_old_versions(fresh: Node) -> None:
    """With [sync] keep = 2 only the two newest synced versions stay, folders included."""
    for version in range(1, 5):
        msg = _message(fresh, version, version, _arrays(fresh.rt, 0.1 * version))
        handle_train(msg, fresh.context, fresh.source)
    store = fresh.synced().store()
    assert len(store.versions(CREATOR)) == 2
    assert [r.version for r in fresh.synced().status()] == [4]
    folders = sorted(p.name for p in (store.root / "slots" / "creator" / "global").iterdir())
    assert len(folders) == 2


def test_a_resent_version_is_not_saved_again_and_a_replay_is_refused(fresh: Node) -> None:
    """The same version sent again is not saved twice; a replayed older round is refused."""
    v1 = _arrays(fresh.rt, 0.5)
    handle_train(_message(fresh, 2, 1, v1), fresh.context, fresh.source)
    fresh.context = _context(fresh.config)  # a restarted node: its Flower cache is gone
    handle_train(_message(fresh, 3, 1, v1), fresh.context, fresh.source)
    assert len(fresh.synced().store().versions(CREATOR)) == 1
    with pytest.raises(ManifestError, match="replayed"):
        handle_train(_message(fresh, 1, 2, _arrays(fresh.rt, 0.9)), fresh.context, fresh.source)


def test_without_a_server_key_nothing_is_saved(fresh: Node, tmp_path: Path) -> None:
    """A node with no [sync] server_key trains as before but saves nothing it cannot verify."""
    synced = SyncedSlots(tmp_path / "synced", None)
    task = _task(1, {str(CREATOR): 1})
    assert (
        synced.accept(RecordDict(), task, {CREATOR: _arrays(fresh.rt, 0.5)}, fresh.rt.stack) == []
    )
    assert synced.status() == []


def test_an_instance_offline_for_rounds_catches_up_on_its_next_task(fresh: Node) -> None:
    """A node that saved v1, then missed rounds 2-4 (restarted, its Flower cache gone), saves
    the version its next task carries (v4, round 5) and a fresh instance composes v4."""
    handle_train(_message(fresh, 1, 1, _arrays(fresh.rt, 0.5)), fresh.context, fresh.source)
    fresh.context = _context(fresh.config)
    v4 = _arrays(fresh.rt, 0.8)
    handle_train(_message(fresh, 5, 4, v4), fresh.context, fresh.source)
    rows = fresh.synced().status()
    assert [(r.slot, r.version, r.round, r.digest) for r in rows] == [
        (str(CREATOR), 4, 5, arrays_digest(v4))
    ]
    inst = Instance.from_config(fresh.config)
    try:
        assert inst.versions[str(CREATOR)] == 4
        assert arrays_digest(inst.stack.get_arrays(CREATOR)) == arrays_digest(v4)
    finally:
        inst.journal.close()
