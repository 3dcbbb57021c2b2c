"""The client side of SecAgg+ on the Message API (see :mod:`layerfed.wire.secagg`).

``setup`` (inside the round's ``train`` message): the instance has trained and
signed its raw delta for its own journal; here the delta is clipped to the
layer's ``clip_norm``, weighted, quantised and kept in the node's context
(never sent), and two fresh X25519 key pairs are made: one to agree pairwise
masks, one to receive Shamir shares; the task is kept with them. ``share_keys``:
shares of the private mask seed and of the mask key go, sealed, to every other
member of the cohort. ``collect``: the masked vector is signed by the instance
and sent. ``unmask``: for each member the server names active, the share of its
mask seed; for each one it names dropped, the share of its mask key, never both
for one member and only once per round.

The stage messages after ``setup`` carry no task, only the round's key
(``run|round|slot|instance``); the node answers a stage only for the task it
verified and kept at ``setup``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, cast

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from layerfed.clients.instance import Instance, RoundUpdate
from layerfed.clients.source import InstanceSource
from layerfed.governance.envelope import UpdateEnvelope, envelope_to_dict
from layerfed.layers.arrays import clip_to_norm, noise_rng
from layerfed.wire.protocol import (
    ENVELOPE,
    METRICS,
    TASK,
    UPDATE,
    MessageError,
    Task,
    arrays_to_record,
)
from layerfed.wire.secagg import (
    MASKED,
    SECAGG,
    SecAggSetup,
    encode_update,
    mask_vector,
    round_key,
)
from layerfed.wire.secagg_crypto import (
    ShareError,
    agree_seed,
    keys_arrays,
    new_key_pair,
    open_share,
    seal_shares,
    share_context,
    shares_arrays,
)
from layerfed.wire.secagg_shamir import share_plaintext, split_plaintext, split_secret

__all__ = ["STATE", "TASK_STATE", "VECTOR", "handle_secagg", "secagg_setup"]

log = logging.getLogger("layerfed")
STATE = "lf.secagg.state"
VECTOR = "lf.secagg.vector"
TASK_STATE = "lf.secagg.task"
"""The task verified at ``setup``, kept for the later stages (their messages carry only its key)."""
NO_BATCH = ""
"""Signing keys and shares settles no journal batch (only the masked update does)."""


def _sign(inst: Instance, arrays: dict[str, Any], task: Task) -> dict[str, str | int]:
    """``arrays`` signed by the instance's node identity, as flat envelope fields."""
    envelope: UpdateEnvelope = inst.sign_masked(
        arrays, task.run_id, task.round, task.slot, 0, NO_BATCH
    )
    return envelope_to_dict(envelope)


def secagg_setup(
    msg: Message, context: Context, update: RoundUpdate, task: Task, inst: Instance
) -> Message:
    """Keep the encoded update in the node's context and answer two fresh, signed public keys."""
    setup = SecAggSetup.from_record(msg.content.config_records[SECAGG])
    delta = update.result.delta
    if setup.clip_norm > 0:
        delta = clip_to_norm(delta, setup.clip_norm).arrays
    examples = update.result.num_events
    vector = encode_update(delta, examples, setup, noise_rng(None))
    sk1, pk1 = new_key_pair()
    sk2, pk2 = new_key_pair()
    state = setup.to_record()
    state.update(
        {
            "key": round_key(task),
            "stage": "setup",
            "num_examples": examples,
            "batch_id": update.batch_id,
            "sk1": sk1,
            "sk2": sk2,
            "pk1": pk1,
            "pk2": pk2,
        }
    )
    context.state.config_records[STATE] = state
    context.state.config_records[TASK_STATE] = task.to_record()
    context.state.array_records[VECTOR] = arrays_to_record({"q": vector})
    binding = _sign(inst, keys_arrays(pk1, pk2), task)
    reply = ConfigRecord({"stage": "setup", "pk1": pk1, "pk2": pk2, **binding})
    metrics = MetricRecord({"num_examples": float(examples)})
    return Message(RecordDict({SECAGG: reply, METRICS: metrics}), reply_to=msg)


def _state(context: Context, key: str, stage: str) -> tuple[ConfigRecord, Task]:
    """This round's saved state and task, if its last stage is the one before ``stage``."""
    state = context.state.config_records.get(STATE)
    saved = context.state.config_records.get(TASK_STATE)
    if state is None or saved is None or state.get("key") != key:
        raise MessageError(f"{SECAGG}: expected a setup for {key}, got none")
    task = Task.from_content(RecordDict({TASK: saved}))
    order = ("setup", "share_keys", "collect", "unmask")
    if order.index(stage) != order.index(str(state["stage"])) + 1:
        raise MessageError(f"{SECAGG}: expected the stage after {state['stage']!r}, got {stage}")
    return state, task


def handle_secagg(msg: Message, context: Context, source: InstanceSource) -> Message:
    """Answer one ``train.secagg`` stage message (for the task kept at ``setup``)."""
    record = msg.content.config_records.get(SECAGG)
    if record is None or not isinstance(record.get("key"), str):
        raise MessageError(f"{SECAGG}: expected a stage record with the round's key, got none")
    stage = str(record["stage"])
    state, task = _state(context, str(record["key"]), stage)
    if stage == "unmask":
        content = RecordDict({SECAGG: _unmask(state, record)})
        del context.state.config_records[STATE]
        del context.state.config_records[TASK_STATE]
        del context.state.array_records[VECTOR]
        return Message(content, reply_to=msg)
    rt = source.runtime(msg, context)
    inst = source.instance(msg, context, rt, source.identity(msg, context, rt, task))
    if stage == "share_keys":
        content = RecordDict({SECAGG: _share_keys(state, record, task, inst)})
    else:
        content = _collect(context, inst, task, state, record)
    state["stage"] = stage
    context.state.config_records[STATE] = state
    return Message(content, reply_to=msg)


def _share_keys(
    state: ConfigRecord, record: ConfigRecord, task: Task, inst: Instance
) -> ConfigRecord:
    ids = [int(i) for i in cast(list[int], record["ids"])]
    pk1s = cast(list[bytes], record["pk1"])
    pk2s = cast(list[bytes], record["pk2"])
    me, threshold, cohort = int(state["id"]), int(state["threshold"]), int(state["cohort"])  # type: ignore[arg-type]
    if len(ids) < threshold or len(set(ids)) != len(ids) or me not in ids:
        raise MessageError(f"{SECAGG}: expected >= {threshold} distinct ids with mine, got {ids}")
    keys = [*pk1s, *pk2s]
    if len(set(keys)) != len(keys) or len(pk1s) != len(ids) or len(pk2s) != len(ids):
        raise MessageError(f"{SECAGG}: expected distinct public keys per member, got duplicates")
    mine = ids.index(me)
    if pk1s[mine] != state["pk1"] or pk2s[mine] != state["pk2"]:
        raise MessageError(f"{SECAGG}: expected my own public keys at id {me}, got others")
    seed = os.urandom(32)
    seed_shares = split_secret(seed, threshold, cohort)
    key_shares = split_secret(cast(bytes, state["sk1"]), threshold, cohort)
    peers = [(other, pk2) for other, pk2 in zip(ids, pk2s, strict=True) if other != me]
    dsts = [other for other, _ in peers]
    epk, texts = seal_shares(
        [pk2 for _, pk2 in peers],
        [share_plaintext(seed_shares[o - 1], key_shares[o - 1]) for o in dsts],
        [share_context(task.run_id, task.round, str(task.slot), me, o) for o in dsts],
    )
    state.update(
        {
            "seed": seed,
            "peer_ids": ids,
            "peer_pk1": pk1s,
            "share_ids": [me],
            "seed_shares": [seed_shares[me - 1]],
            "key_shares": [key_shares[me - 1]],
        }
    )
    signed = _sign(inst, shares_arrays(epk, dsts, texts), task)
    return ConfigRecord(
        {"stage": "share_keys", "epk": epk, "dsts": dsts, "ciphertexts": texts, **signed}
    )


def open_peer_share(
    sk2: bytes, epk: bytes, text: bytes, task: Task, src: int, me: int
) -> tuple[bytes, bytes]:
    """The seed share and mask-key share ``src`` sealed for ``me``; ShareError when they do not open."""
    where = share_context(task.run_id, task.round, str(task.slot), src, me)
    try:
        return split_plaintext(open_share(sk2, epk, text, where))
    except ValueError as e:  # ShareError is one too
        raise ShareError(f"{SECAGG}: expected a share from {src} to {me}, got {e}") from e


def _collect(
    context: Context, inst: Instance, task: Task, state: ConfigRecord, record: ConfigRecord
) -> RecordDict:
    """Open the peers' shares, mask, sign; a share that does not open becomes a complaint.

    The complaint names the sender with the ciphertext it signed and shows this
    member's ``sk2`` (the server checks it against the signed ``pk2``, then tries the
    ciphertext itself). The pairwise mask with a sender complained about is left out,
    so the server never needs that sender's mask key.
    """
    me, threshold = int(state["id"]), int(state["threshold"])  # type: ignore[arg-type]
    srcs = [int(s) for s in cast(list[int], record["srcs"])]
    texts = cast(list[bytes], record["ciphertexts"])
    epks = cast(list[bytes], record["epks"])
    if len(epks) != len(srcs) or len(texts) != len(srcs):
        raise MessageError(f"{SECAGG}: expected one key and ciphertext per sender, got {len(srcs)}")
    if len(srcs) + 1 < threshold:
        raise MessageError(f"{SECAGG}: expected >= {threshold - 1} peers' shares, got {len(srcs)}")
    peers = [int(i) for i in cast(list[int], state["peer_ids"])]
    pk1s = cast(list[bytes], state["peer_pk1"])
    sk1, sk2 = cast(bytes, state["sk1"]), cast(bytes, state["sk2"])
    share_ids = [me]
    seed_shares = list(cast(list[bytes], state["seed_shares"]))
    key_shares = list(cast(list[bytes], state["key_shares"]))
    pairs: list[tuple[int, bytes]] = []
    blamed: list[int] = []
    evidence: list[bytes] = []
    for src, epk, text in zip(srcs, epks, texts, strict=True):
        if src not in peers or src == me or src in share_ids or src in blamed:
            raise MessageError(f"{SECAGG}: expected shares from distinct peers, got {src}")
        try:
            seed_share, key_share = open_peer_share(sk2, epk, text, task, src, me)
        except ShareError as e:
            log.warning("secagg: the share from member %s does not open (%s): complaint", src, e)
            blamed.append(src)
            evidence.append(text)
            continue
        share_ids.append(src)
        seed_shares.append(seed_share)
        key_shares.append(key_share)
        pairs.append((src, agree_seed(sk1, pk1s[peers.index(src)])))
    vector = context.state.array_records[VECTOR]["q"].numpy()
    masked = mask_vector(vector, cast(bytes, state["seed"]), pairs, me)
    arrays = {MASKED: masked}
    examples = int(state["num_examples"])  # type: ignore[arg-type]
    batch = str(state["batch_id"])  # acknowledged by the masked update's id from now on
    envelope = inst.sign_masked(arrays, task.run_id, task.round, task.slot, examples, batch)
    state.update(
        {
            "share_ids": share_ids,
            "seed_shares": seed_shares,
            "key_shares": key_shares,
            "blamed": blamed,
        }
    )
    answer: dict[str, Any] = {"stage": "collect"}
    if blamed:
        answer.update({"blame": blamed, "blame_texts": evidence, "sk2": sk2})
    return RecordDict(
        {
            UPDATE: arrays_to_record(arrays),
            ENVELOPE: ConfigRecord(dict(envelope_to_dict(envelope).items())),
            SECAGG: ConfigRecord(answer),
        }
    )


def _unmask(state: ConfigRecord, record: ConfigRecord) -> ConfigRecord:
    me, threshold = int(state["id"]), int(state["threshold"])  # type: ignore[arg-type]
    active = [int(i) for i in cast(list[int], record["active"])]
    dead = [int(i) for i in cast(list[int], record["dead"])]
    held = [int(i) for i in cast(list[int], state["share_ids"])]
    blamed = {int(i) for i in cast(list[int], state.get("blamed", []))}
    if set(active) & set(dead) or len(set(active)) != len(active) or len(set(dead)) != len(dead):
        raise MessageError(
            f"{SECAGG}: expected disjoint active and dropped ids, got {active} / {dead}"
        )
    if me not in active or len(active) < threshold:
        raise MessageError(f"{SECAGG}: expected >= {threshold} active ids with mine, got {active}")
    if not set(active) | set(dead) <= set(held) | blamed or set(active) & blamed:
        raise MessageError(
            f"{SECAGG}: expected ids whose shares I hold ({held}) or dropped ids I"
            f" complained about ({sorted(blamed)}), got others"
        )
    seeds = cast(list[bytes], state["seed_shares"])
    keys = cast(list[bytes], state["key_shares"])
    ids = [i for i in active if i in held] + [i for i in dead if i in held]
    shares: list[Any] = [seeds[held.index(i)] for i in active if i in held]
    shares += [keys[held.index(i)] for i in dead if i in held]
    return ConfigRecord({"stage": "unmask", "ids": ids, "shares": shares})
