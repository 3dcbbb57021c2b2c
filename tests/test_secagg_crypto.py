"""SecAgg+ share sealing and complaint judging: who is to blame for a share that does not open."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from layerfed.federation.secagg_blame import judge_complaint
from layerfed.federation.secagg_server import SecAggServer
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.envelope import envelope_to_dict, sign_update
from layerfed.layers.slots import SlotId
from layerfed.simulation.keys import layer_principal, sim_certificate, sim_instance_key
from layerfed.wire.protocol import Task
from layerfed.wire.secagg import SECAGG
from layerfed.wire.secagg_crypto import (
    ShareError,
    agree_seed,
    keys_arrays,
    new_key_pair,
    open_share,
    public_of,
    seal_shares,
    share_context,
)
from layerfed.wire.secagg_shamir import combine_secret, share_plaintext, split_secret
from tests.round_helpers import RUN, SEED, Harness
from tests.test_secagg_range import secure_policy

SLOT = SlotId("in_group", "g1")
TASK = Task("run", 3, 7, "m-1", SLOT.layer, SLOT, {})


def _sealed(src: int, dst: int, pk2: bytes, plain: bytes | None = None) -> tuple[bytes, bytes]:
    """(epk, ciphertext) of a share ``src`` seals for ``dst`` (default: a well-formed one)."""
    text = plain if plain is not None else share_plaintext(b"s" * 32, b"k" * 32)
    epk, texts = seal_shares([pk2], [text], [share_context("run", 3, str(SLOT), src, dst)])
    return epk, texts[0]


def test_a_sealed_share_opens_only_for_its_receiver_and_context() -> None:
    """Only the receiver's sk2 opens a share, and only for the same run/round/slot/src/dst."""
    sk2, pk2 = new_key_pair()
    other, _ = new_key_pair()
    epk, text = _sealed(1, 2, pk2, b"secret")
    assert open_share(sk2, epk, text, share_context("run", 3, str(SLOT), 1, 2)) == b"secret"
    with pytest.raises(ShareError):
        open_share(other, epk, text, share_context("run", 3, str(SLOT), 1, 2))
    with pytest.raises(ShareError):
        open_share(
            sk2, epk, text, share_context("run", 3, str(SLOT), 3, 2)
        )  # replayed as another's
    flipped = text[:-1] + bytes([text[-1] ^ 1])
    with pytest.raises(ShareError):
        open_share(sk2, epk, flipped, share_context("run", 3, str(SLOT), 1, 2))
    with pytest.raises(ShareError):
        open_share(sk2, new_key_pair()[1], text, share_context("run", 3, str(SLOT), 1, 2))
    assert public_of(sk2) == pk2


def test_one_ephemeral_key_seals_each_receiver_apart() -> None:
    """One sender's shares under one ephemeral key: each opens only with its own receiver's sk2."""
    (sa, pa), (sb, pb) = new_key_pair(), new_key_pair()
    where = [share_context("run", 3, str(SLOT), 1, d) for d in (2, 3)]
    epk, (ta, tb) = seal_shares([pa, pb], [b"to-a", b"to-b"], where)
    assert open_share(sa, epk, ta, where[0]) == b"to-a"
    assert open_share(sb, epk, tb, where[1]) == b"to-b"
    with pytest.raises(ShareError):
        open_share(sa, epk, tb, where[1])  # a receiver's key opens nothing sealed for another
    assert len(ta) == len(b"to-a") + 16  # ciphertext + tag; the key travels once per sender


def test_compact_shares_rebuild_the_secret_from_any_threshold() -> None:
    """32-byte shares, x implied by the holder: any t rebuild the secret, t-1 do not."""
    secret = os.urandom(32)
    shares = split_secret(secret, 4, 7)
    assert all(len(s) == 32 for s in shares)
    assert combine_secret([(x, shares[x - 1]) for x in (1, 2, 3, 4)]) == secret
    assert combine_secret([(x, shares[x - 1]) for x in (7, 3, 5, 2)]) == secret
    assert combine_secret([(x, shares[x - 1]) for x in (1, 2, 3)]) != secret
    assert combine_secret([(x, shares[x % 7]) for x in (1, 2, 3, 4)]) != secret  # wrong x


def test_pairwise_seeds_agree_and_differ_between_pairs() -> None:
    """Both ends of a pair derive the same 32-byte seed; another pair derives another."""
    (a, pa), (b, pb), (_, pc) = new_key_pair(), new_key_pair(), new_key_pair()
    assert agree_seed(a, pb) == agree_seed(b, pa)
    assert len(agree_seed(a, pb)) == 32 and agree_seed(a, pc) != agree_seed(a, pb)


def test_garbage_signed_by_the_sender_blames_the_sender() -> None:
    """A signed ciphertext that does not open (or opens to a share for someone else) blames the sender."""
    sk2, pk2 = new_key_pair()
    epk = new_key_pair()[1]
    junk = os.urandom(80)
    verdict = judge_complaint(TASK, 4, 2, junk, junk, epk, sk2, pk2)
    assert (verdict.blamed, verdict.reason) == (4, "corrupt_share")
    epk, misdirected = _sealed(4, 3, pk2)  # sealed for the pair 4 -> 3, delivered to 2
    verdict = judge_complaint(TASK, 4, 2, misdirected, misdirected, epk, sk2, pk2)
    assert (verdict.blamed, verdict.reason) == (4, "corrupt_share")
    epk, short = _sealed(4, 2, pk2, b"too short for two shares")
    verdict = judge_complaint(TASK, 4, 2, short, short, epk, sk2, pk2)
    assert (verdict.blamed, verdict.reason) == (4, "corrupt_share")


def test_a_false_complaint_blames_the_complainer() -> None:
    """A share that opens, a ciphertext the sender never signed, or another key shown: the complainer."""
    sk2, pk2 = new_key_pair()
    epk, good = _sealed(4, 2, pk2)
    assert judge_complaint(TASK, 4, 2, good, good, epk, sk2, pk2).blamed == 2
    junk = os.urandom(80)
    unsigned = judge_complaint(TASK, 4, 2, junk, good, epk, sk2, pk2)
    assert (unsigned.blamed, unsigned.reason) == (2, "false_complaint")
    assert judge_complaint(TASK, 4, 2, junk, None, epk, sk2, pk2).blamed == 2
    other, _ = new_key_pair()
    assert judge_complaint(TASK, 4, 2, junk, junk, epk, other, pk2).blamed == 2


class _Silent:
    """A grid on which every stage message goes unanswered."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return []


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Harness:
    """A server harness (stack of the default policy's tiny base)."""
    return Harness(tmp_path_factory.mktemp("keys"))


def test_keys_not_signed_by_the_node_identity_are_refused(harness: Harness, tmp_path: Path) -> None:
    """Public keys signed by another instance's key, or swapped after signing, never reach the peers."""
    server = SecAggServer(secure_policy(tmp_path), harness.stack, RUN, 1.0)
    messages = [harness.task(node, SLOT) for node in range(1, 5)]
    server.setup(messages, {n: harness.pending[n] for n in range(1, 5)})
    replies = []
    for node, msg in enumerate(messages, start=1):
        instance = f"inst-{node}"
        pk1, pk2 = new_key_pair()[1], new_key_pair()[1]
        envelope = sign_update(
            keys_arrays(pk1, pk2),
            principal_name=layer_principal(SLOT.layer),
            private_key=sim_instance_key(SEED, "inst-1" if node == 2 else instance),
            certificate=sim_certificate(SEED, instance, SLOT.layer),
            run_id=RUN,
            round=1,
            layer=SLOT.layer,
            slot_key=SLOT.key,
            instance_id=instance,
            num_examples=0,
        )
        if node == 3:
            pk1 = new_key_pair()[1]  # swapped after signing
        record = ConfigRecord(
            {"stage": "setup", "pk1": pk1, "pk2": pk2, **envelope_to_dict(envelope)}
        )
        replies.append(Message(RecordDict({SECAGG: record}), reply_to=msg))
    result = server.run(cast(Grid, _Silent()), 1, replies)
    assert sorted(server.cohorts[SLOT].keys) == [1, 4]
    refused = {
        f["instance"]: (f["reason"], f["detail"])
        for e in result.events
        if e.kind == AuditKind.UPDATE_REFUSED
        for f in [e.as_fields()]
    }
    assert sorted(refused) == ["inst-2", "inst-3"]
    assert refused["inst-2"][0] == "unbound_key" and "bad_certificate" in refused["inst-2"][1]
    assert refused["inst-3"][0] == "unbound_key" and "digest_mismatch" in refused["inst-3"][1]
