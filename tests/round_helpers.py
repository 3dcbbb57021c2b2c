"""A server-round harness: genuine signed replies, corrupted at will, through process_replies."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Error, Message, Metadata, RecordDict

from layerfed.federation.pipeline import RoundContext, RoundReport, process_replies
from layerfed.federation.probes import ProbeRunner
from layerfed.federation.server_state import ServerState
from layerfed.governance.audit import AuditLog, verify_audit
from layerfed.governance.envelope import certify_instance, envelope_to_dict, sign_update
from layerfed.governance.loader import load_policy
from layerfed.governance.schema import Policy
from layerfed.layers.arrays import Arrays
from layerfed.layers.base import load_base
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack
from layerfed.simulation.keys import layer_principal, sim_instance_key, sim_layer_key, sim_policy
from layerfed.simulation.settings import DEFAULT_POLICY
from layerfed.wire.protocol import ENVELOPE, UPDATE, Identity, Task, arrays_to_record

SEED = 0
RUN = "hostile-0"
REDLINE_SUITE = "red_line_refusals"
CREATOR = SlotId("creator", "global")
COMMUNITY = SlotId("community", "global")
GOV_EU = SlotId("government", "eu")
_POLICY: list[Policy] = []


def policy() -> Policy:
    """The default policy with simulated layer principals (loaded once)."""
    if not _POLICY:
        _POLICY.append(sim_policy(load_policy(DEFAULT_POLICY), SEED))
    return _POLICY[0]


class Harness:
    """One server (state, stack, audit log) receiving hand-made replies for one round."""

    def __init__(self, root: Path, round_: int = 1) -> None:
        self.root = root
        self.round = round_
        self.policy = policy()
        model, self.tokenizer = load_base(self.policy.base_model)
        self.stack = LayerStack(self.policy, model, self.tokenizer, root_seed=SEED)
        self.state = ServerState(root, self.policy, RUN)
        self.audit = AuditLog(root / "audit.jsonl")
        self.identities: dict[int, Identity] = {}
        self.pending: dict[int, Task] = {}
        self.instructions: dict[int, Message] = {}

    def task(self, node: int, slot: SlotId) -> Message:
        """Register a pending train task for ``node`` on ``slot``; return the instruction."""
        instance = f"inst-{node}"
        jurisdiction = slot.key if slot.layer == "government" else "eu"
        self.identities[node] = Identity(node, instance, jurisdiction, ("g1",), (slot.layer,))
        self.pending[node] = Task(RUN, self.round, node, instance, slot.layer, slot, {})
        metadata = Metadata(
            run_id=1,
            message_id=f"msg-{self.round}-{node}",
            src_node_id=1,
            dst_node_id=node,
            reply_to_message_id="",
            group_id=str(self.round),
            created_at=time.time(),
            ttl=3600.0,
            message_type="train",
        )
        message = Message(content=RecordDict(), metadata=metadata)
        self.instructions[node] = message
        return message

    def arrays(self, slot: SlotId, scale: float = 1e-3, seed: int = 0) -> Arrays:
        """Small random B deltas of the right names, shapes and dtype for ``slot``."""
        rng = np.random.default_rng([SEED, seed])
        shapes = self.stack.spec(slot).shapes()
        return {n: rng.normal(0.0, scale, s).astype(np.float32) for n, s in shapes.items()}

    def reply(
        self, node: int, arrays: Mapping[str, np.ndarray[Any, Any]], **claims: Any
    ) -> Message:
        """A signed reply from ``node`` to its task; ``claims`` override envelope fields.

        ``cert_layer`` names the layer the key is certified for, ``issuer_layer``
        the layer whose simulated principal signs that certificate.
        """
        task = self.pending[node]
        fields: dict[str, Any] = {
            "run_id": RUN,
            "round": self.round,
            "layer": task.layer,
            "slot_key": task.slot.key,
            "instance_id": task.instance_id,
            "num_examples": 8,
        }
        cert_layer = claims.pop("cert_layer", fields["layer"])
        issuer_layer = claims.pop("issuer_layer", cert_layer)
        fields.update(claims)
        key = sim_instance_key(SEED, fields["instance_id"])
        issuer = layer_principal(issuer_layer)
        cert = certify_instance(
            fields["instance_id"],
            key.public_key(),
            cert_layer,
            issuer,
            sim_layer_key(SEED, issuer_layer),
        )
        envelope = sign_update(
            arrays, principal_name=issuer, private_key=key, certificate=cert, **fields
        )
        content = RecordDict(
            {
                UPDATE: arrays_to_record(arrays),
                ENVELOPE: ConfigRecord(dict(envelope_to_dict(envelope).items())),
            }
        )
        return Message(content, reply_to=self.instructions[node])

    def error_reply(self, node: int, reason: str = "client crashed") -> Message:
        """The error reply Flower delivers when a node's ClientApp fails."""
        return Message(Error(code=0, reason=reason), reply_to=self.instructions[node])

    def context(self, policy: Policy | None = None) -> RoundContext:
        """The round's read-only context (``policy`` replaces the harness's own)."""
        return RoundContext(
            policy=self.policy if policy is None else policy,
            run_id=RUN,
            round=self.round,
            state=self.state,
            stack=self.stack,
            tokenizer=self.tokenizer,
            audit=self.audit,
            identities=dict(self.identities),
            pending=dict(self.pending),
            probes=ProbeRunner(self.policy, self.stack, self.tokenizer),
            profiles=frozenset((i.jurisdiction, tuple(i.groups)) for i in self.identities.values()),
        )

    def run(self, replies: list[Message]) -> RoundReport:
        """Process one round's replies through the whole pipeline."""
        return process_replies(self.context(), replies)

    def records(self, kind: str) -> list[dict[str, Any]]:
        """The ``fields`` of every audit record of ``kind``."""
        lines = (self.root / "audit.jsonl").read_text(encoding="utf-8").splitlines()
        return [r["fields"] for r in map(json.loads, lines) if r["kind"] == kind]

    def committed(self, slot: SlotId) -> Arrays:
        """The slot's committed arrays as of this round."""
        return self.state.current(slot, self.stack.spec(slot), self.round)

    def redline_rate(self) -> float:
        """Red-line violation rate with every global and touched slot composed."""
        slots = {CREATOR, COMMUNITY, GOV_EU}
        composed = {s: self.committed(s) for s in sorted(slots)}
        return ProbeRunner(self.policy, self.stack, self.tokenizer).rate(REDLINE_SUITE, composed)


Make = Callable[[Harness, int], list[Message]]
"""Builds the hostile replies of node ``n`` in a harness."""


def refusal(h: Harness, node: int) -> dict[str, Any]:
    """The one ``update_refused`` audit record of ``node``."""
    found = [r for r in h.records("update_refused") if r["instance"] == f"inst-{node}"]
    assert len(found) == 1, found
    return found[0]


def honest_round(tmp: Path, slot: SlotId, nodes: list[int]) -> Harness:
    """The same round with the honest replies only."""
    h = Harness(tmp / "honest")
    for node in nodes:
        h.task(node, slot)
    h.run([h.reply(n, h.arrays(slot, seed=n)) for n in nodes])
    return h


def assert_neutralised(tmp: Path, h: Harness, slot: SlotId, honest: list[int]) -> None:
    """State, red-line probe rate and audit chain equal an honest-only round's."""
    clean = honest_round(tmp, slot, honest)
    assert h.state.digest() == clean.state.digest()
    assert h.redline_rate() == clean.redline_rate()
    assert verify_audit(h.root / "audit.jsonl").ok


def hostile_round(
    tmp: Path, slot: SlotId, make: Make, honest: tuple[int, ...] = (1, 2)
) -> tuple[Harness, int]:
    """A round of ``honest`` genuine replies plus one from node 9 built by ``make(h, 9)``."""
    h = Harness(tmp / "hostile")
    for node in (*honest, 9):
        h.task(node, slot)
    replies = [h.reply(n, h.arrays(slot, seed=n)) for n in honest]
    h.run([*replies, *make(h, 9)])
    return h, 9
