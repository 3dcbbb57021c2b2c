"""An instance owns its side of a round: the local step and commit, decay, and its journal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from layerfed.clients.events import InvalidFeedback, Preference, Thumbs
from layerfed.clients.instance import Instance, InstanceError
from layerfed.clients.instance_rounds import TrainPlan
from layerfed.clients.local_slots import LocalSlots
from layerfed.clients.source import NodeRuntime
from layerfed.governance.keys import public_key_string
from layerfed.governance.schema import Policy
from layerfed.layers.arrays import Arrays
from layerfed.layers.instance_disk import InstanceDisk
from layerfed.layers.slots import SlotId, parse_array_name

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "please tell cake"
SERVER_LR = 0.5
"""Not 1: a step applied twice (0.25) or not at all (1 or 0) gives other arrays."""


def _policy(key: Ed25519PrivateKey) -> Policy:
    data = yaml.safe_load((ROOT / "examples/policies/default.yaml").read_text(encoding="utf-8"))
    data["superego"] = {**data["superego"], "enabled": False}
    for layer in data["layers"]:
        if layer["name"] == "individual":
            layer["server_lr"] = SERVER_LR
    for layer in ("individual", "community"):
        public = public_key_string(key.public_key())
        data["principals"].append({"name": f"me_{layer}", "layer": layer, "public_key": public})
    return Policy.model_validate(data)


def _setup(tmp_path: Path) -> tuple[Instance, LocalSlots, dict[SlotId, Arrays], SlotId]:
    """An instance whose individual slot stays on it, its disk, the shared slots at zero."""
    key = Ed25519PrivateKey.generate()
    inst = Instance(_policy(key), instance_id="inst-1", jurisdiction="eu", key=key)
    rt = NodeRuntime(inst.policy, inst.stack)
    local = LocalSlots(inst.policy, InstanceDisk(tmp_path / "slots"), rt.zeros)
    received = {s: rt.zeros(s) for s in inst.slots if not local.owns(s)}
    return inst, local, received, inst.slot_for("individual")


def _thumbs(inst: Instance, n: int) -> None:
    inst.feedback_many(
        [Thumbs(prompt=PROMPT, response=f"sure here {w}", up=True) for w in ("cake", "bread")[:n]]
    )


def _saved(local: LocalSlots, round_: int) -> Arrays:
    loaded = local.disk.load_before(round_ + 1)
    assert loaded is not None and loaded[0] == round_
    return loaded[1]


def test_a_round_of_an_instance_only_slot_steps_once_by_server_lr_and_commits(
    tmp_path: Path,
) -> None:
    """run_round on the individual slot commits exactly zeros + server_lr * delta (float64
    maths, float32 kept) to the instance's disk, sends no arrays, and consumes its batch."""
    inst, local, received, slot = _setup(tmp_path)
    _thumbs(inst, 2)
    update = inst.run_round("run", 1, slot, received, local, TrainPlan(seed=1))
    assert update.committed_locally and update.arrays == {}
    saved = _saved(local, 1)
    delta = update.result.delta
    assert set(saved) == set(delta) and any(np.any(a) for a in delta.values())
    for name, d in delta.items():
        once = (d.astype(np.float64) * SERVER_LR).astype(np.float32)
        assert saved[name].dtype == np.float32
        assert np.array_equal(saved[name], once), name
        assert not np.array_equal(saved[name], d)  # not the raw delta
        assert not np.array_equal(saved[name], (once * SERVER_LR).astype(np.float32))
    assert [b.state for b in inst.journal.batches()] == ["consumed"]
    assert inst.journal.counts() == {"pending": 0, "batched": 0, "consumed": 2}


def test_commit_local_steps_from_the_current_arrays_and_refuses_a_shared_slot(
    tmp_path: Path,
) -> None:
    """commit_local adds server_lr * delta to the slot's current arrays (not to zero) and
    returns them; an update of a slot whose updates leave the instance is refused."""
    inst, local, received, slot = _setup(tmp_path)
    _thumbs(inst, 1)
    update = inst.train_round("run", 2, slot, seed=3)
    start = {k: np.full_like(v, 0.125) for k, v in local.load(slot, 2).items()}
    current = {**received, slot: start}
    committed = inst.commit_local(update, local, current)
    for name, d in update.result.delta.items():
        expected = (start[name] + (d.astype(np.float64) * SERVER_LR).astype(np.float32)).astype(
            np.float32
        )
        assert np.array_equal(committed[name], expected), name
        assert np.array_equal(_saved(local, 2)[name], expected), name
    assert [b.state for b in inst.journal.batches()] == ["consumed"]
    shared = SlotId("community", "global")
    inst.feedback(Thumbs(prompt=PROMPT, response="sure", up=True), role="community")
    other = inst.train_round("run", 3, shared, seed=3)
    with pytest.raises(InstanceError, match=r"update\.slot"):
        inst.commit_local(other, local, current)


def test_the_next_round_starts_from_the_commit_decayed_by_each_memorys_half_life(
    tmp_path: Path,
) -> None:
    """Round 3 reads round 1's commit with stm (half-life 3 rounds) at 2**(-2/3) and ltm
    (300 rounds) at 2**(-2/300), and commits that plus one server step of its own delta."""
    inst, local, received, slot = _setup(tmp_path)
    _thumbs(inst, 2)
    inst.run_round("run", 1, slot, received, local, TrainPlan(seed=1))
    first = _saved(local, 1)
    factors = {"stm": 2.0 ** (-2 / 3), "ltm": 2.0 ** (-2 / 300)}
    decayed = local.load(slot, 3)
    for name, value in first.items():
        factor = np.float32(factors[parse_array_name(name).memory])
        assert np.array_equal(decayed[name], value * factor), name
    inst.feedback(Preference(prompt=PROMPT, chosen="sure here cake", rejected="no"))
    update = inst.run_round("run", 3, slot, received, local, TrainPlan(seed=2))
    third = _saved(local, 3)
    for name, d in update.result.delta.items():
        step = (d.astype(np.float64) * SERVER_LR).astype(np.float32)
        assert np.array_equal(third[name], (decayed[name] + step).astype(np.float32)), name


def test_batches_a_crash_left_are_consumed_iff_their_round_was_committed(tmp_path: Path) -> None:
    """settle_local (run_round's first step) consumes an instance-only slot's live batch
    whose round is on disk and releases one whose round is not (its events train again)."""
    inst, local, _, slot = _setup(tmp_path)
    _thumbs(inst, 1)
    lost = inst.train_round("run", 1, slot, seed=1)  # crashed before the commit
    inst.settle_local("run", 2, local)
    assert {b.id: b.state for b in inst.journal.batches()} == {lost.batch_id: "released"}
    assert inst.journal.counts()["pending"] == 1
    kept = inst.train_round("run", 2, slot, seed=1)
    local.disk.save(2, local.load(slot, 2))  # the commit landed, the crash came after it
    inst.settle_local("run", 3, local)
    states = {b.id: b.state for b in inst.journal.batches()}
    assert states == {lost.batch_id: "released", kept.batch_id: "consumed"}
    assert inst.journal.counts() == {"pending": 0, "batched": 0, "consumed": 1}


def test_a_masked_update_acknowledges_the_batch_it_was_trained_on(tmp_path: Path) -> None:
    """sign_masked records the masked envelope's id on the round's batch, so the server's
    acknowledgement of that id consumes the batch (secure aggregation's path)."""
    inst, _, _, _ = _setup(tmp_path)
    shared = SlotId("community", "global")
    inst.feedback(Thumbs(prompt=PROMPT, response="sure", up=True), role="community")
    update = inst.train_round("run", 4, shared, seed=1)
    masked = {"masked": np.arange(4, dtype=np.int64)}
    envelope = inst.sign_masked(masked, "run", 4, shared, 1, update.batch_id)
    assert envelope.ack_id != update.envelope.ack_id
    inst.acknowledge("run", [envelope.ack_id], 5)
    assert [b.state for b in inst.journal.batches()] == ["consumed"]


def test_feedback_many_checks_every_event_before_writing_any(tmp_path: Path) -> None:
    """feedback_many (how the gym's people give feedback) journals events in order, and a
    batch with one event the tokenizer cannot train on writes nothing."""
    inst, _, _, _ = _setup(tmp_path)
    good = Thumbs(prompt=PROMPT, response="sure here cake", up=True)
    bad = {
        "kind": "alternative",
        "prompt": PROMPT,
        "response": "sure here",
        "position": 5,
        "chosen_token": 3,
        "candidates": [3, 4],
    }
    with pytest.raises(InvalidFeedback, match="position"):
        inst.feedback_many([good, bad])
    assert inst.events == ()
    assert inst.feedback_many([good, good]) == [1, 2]
    assert inst.events == (good, good)
