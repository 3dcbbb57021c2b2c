"""SecAgg+ blame on a real Flower simulation: a corrupt share names its sender, unsigned keys are refused.

One secure gym run of an ``in_group`` slot with six members whose ClientApp
carries a hostile mod: in round 1 member ``m-5`` seals garbage for every peer
(and signs it, as a hostile member with its own key can); in round 2 member
``m-4`` answers public keys that its node identity did not sign (it signs them
with another instance's key). Both rounds must complete with the five others.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import pytest
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from layerfed.clients.client_app import handle_query, handle_train
from layerfed.clients.secagg_client import handle_secagg
from layerfed.governance.envelope import envelope_to_dict, sign_update
from layerfed.layers.slots import SlotId
from layerfed.simulation.client import GymSource
from layerfed.simulation.keys import layer_principal, sim_certificate, sim_instance_key
from layerfed.simulation.settings import SimSettings
from layerfed.simulation.simulate import simulate
from layerfed.wire.secagg import SECAGG
from layerfed.wire.secagg_crypto import keys_arrays, shares_arrays
from tests.test_secagg_simulation import _server, _settings, member_round

pytestmark = pytest.mark.slow
SLOT = SlotId("in_group", "g1")
GARBAGE = ("m-5", 1)
"""(member, round): seals garbage shares to every peer, signed with its own key."""
UNBOUND = ("m-4", 2)
"""(member, round): answers public keys signed by another instance's key."""


def _resign(
    record: ConfigRecord, arrays: dict[str, Any], who: tuple[str, str, int], signer: str
) -> None:
    """Replace ``record``'s envelope with one over ``arrays`` signed by ``signer``'s key."""
    run, instance, round_ = who
    envelope = sign_update(
        arrays,
        run_id=run,
        round=round_,
        layer=SLOT.layer,
        slot_key=SLOT.key,
        instance_id=instance,
        num_examples=0,
        principal_name=layer_principal(SLOT.layer),
        private_key=sim_instance_key(0, signer),
        certificate=sim_certificate(0, instance, SLOT.layer),
    )
    record.update(envelope_to_dict(envelope))


def _hostile(settings: SimSettings) -> ClientApp:
    source = GymSource(settings)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        claims = member_round(msg)
        if claims is None or reply.has_error() or SECAGG not in reply.content.config_records:
            return reply
        who = (claims[1], claims[2])
        record = reply.content.config_records[SECAGG]
        if who == GARBAGE and record["stage"] == "share_keys":
            dsts = [int(d) for d in cast(list[int], record["dsts"])]
            texts = [os.urandom(len(t)) for t in cast(list[bytes], record["ciphertexts"])]
            record["ciphertexts"] = texts
            _resign(record, shares_arrays(cast(bytes, record["epk"]), dsts, texts), claims, who[0])
        if who == UNBOUND and record["stage"] == "setup":
            keys = keys_arrays(cast(bytes, record["pk1"]), cast(bytes, record["pk2"]))
            _resign(record, keys, claims, "m-0")
        return reply

    app = ClientApp(mods=[mod])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, source)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, source)

    @app.train("secagg")
    def secagg(msg: Message, context: Context) -> Message:
        return handle_secagg(msg, context, source)

    return app


def _audit(out: Path) -> list[dict[str, Any]]:
    lines = (out / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_a_corrupt_share_blames_its_sender_and_unsigned_keys_are_refused(tmp_path: Path) -> None:
    """Garbage shares: the sender is dropped and audited by node, the rest unmask; unbound keys refused."""
    settings = _settings(tmp_path, secure=True, rounds=2)
    state = simulate(settings, server_app=_server(settings, []), client_app=_hostile(settings))
    records = _audit(Path(settings.out))
    secagg = {r["fields"]["round"]: r["fields"] for r in records if r["kind"] == "secagg"}

    # Round 1: m-5's shares open for nobody; it alone is blamed, the five others unmask.
    assert secagg[1]["outcome"] == "unmasked", secagg[1]
    assert secagg[1]["masked"] == 5 and secagg[1]["blamed"] == ["m-5"]
    refused = [r["fields"] for r in records if r["kind"] == "update_refused"]
    blame = [r for r in refused if r["round"] == 1]
    assert [(r["instance"], r["reason"]) for r in blame] == [("m-5", "corrupt_share")]
    assert isinstance(blame[0]["node"], int)
    dropped = [r["fields"] for r in records if r["kind"] == "update_dropped"]
    assert not dropped, dropped

    # Round 2: m-4's keys are not signed by its node identity: refused, the rest unmask.
    assert secagg[2]["outcome"] == "unmasked", secagg[2]
    assert secagg[2]["keys"] == 5 and secagg[2]["masked"] == 5
    unbound = [r for r in refused if r["round"] == 2]
    assert [(r["instance"], r["reason"]) for r in unbound] == [("m-4", "unbound_key")]
    assert "bad_certificate" in unbound[0]["detail"] or "bad_signature" in unbound[0]["detail"]
    assert state.store.versions(SLOT) == [1, 2]
