"""The server side of SecAgg+ on the Message API: learn each secure slot's sum, nothing else.

:meth:`SecAggServer.setup` adds a ``setup`` record to the round's ``train``
messages of secure slots (each cohort's members get ids 1..n by instance id).
:meth:`SecAggServer.run`, called from ``aggregate_train`` with the grid kept from
``configure_train``, takes those replies (two public keys each) and runs the
other stages for all secure slots at once: ``share_keys`` (encrypted Shamir
shares routed between members), ``collect`` (signed masked vectors, verified
like any update) and ``unmask`` (shares of survivors' mask seeds and of dropped
members' mask keys). It then removes the masks and decodes the weighted mean.
It writes no audit record itself: its events travel with the sums
(:class:`SecureRound`) to the pipeline's recorder.
A slot skips the round, audited, when fewer than the threshold (or
``min_clients``) survive, more than ``max_dropout_fraction`` drop, the shares
cannot rebuild a secret, or the weights in the sum disagree with the signed
claims.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from layerfed.errors import LayerfedError
from layerfed.federation.events import AuditEvent, Events, event, update_refused
from layerfed.federation.secagg_blame import judge_complaint, signed_by_member
from layerfed.federation.secagg_cohort import Cohort, RefusedSumError, unmask_sum
from layerfed.federation.secure_sum import SecureSum
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.envelope import ReplayGuard, check_update, envelope_from_dict
from layerfed.governance.schema import LayerPolicy, Policy
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack
from layerfed.wire.protocol import ENVELOPE, UPDATE, Task, arrays_from_record
from layerfed.wire.secagg import MASKED, SECAGG, SECAGG_MESSAGE, round_key
from layerfed.wire.secagg_crypto import keys_arrays, shares_arrays

__all__ = ["SecAggServer", "SecureRound", "is_secure"]

log = logging.getLogger("layerfed")


@dataclass(frozen=True)
class SecureRound:
    """What :meth:`SecAggServer.run` hands the round: plain replies, secure sums, audit events."""

    plain: list[Message]
    sums: dict[SlotId, SecureSum]
    events: Events


def is_secure(layer: LayerPolicy) -> bool:
    """Whether ``layer``'s slots are aggregated securely."""
    return layer.privacy is not None and layer.privacy.mode == "secure_aggregation"


class SecAggServer:
    """Runs SecAgg+ for the secure slots of each round (see the module docstring)."""

    def __init__(self, policy: Policy, stack: LayerStack, run_id: str, timeout: float) -> None:
        self.policy, self.stack, self.run_id = policy, stack, run_id
        self.timeout = timeout
        self.cohorts: dict[SlotId, Cohort] = {}
        self.by_node: dict[int, tuple[Cohort, int]] = {}
        self._events: list[AuditEvent] = []
        """This round's audit events so far (handed to the pipeline's recorder by :meth:`run`)."""

    def setup(self, messages: list[Message], pending: dict[int, Task]) -> None:
        """Form this round's cohorts and put a ``setup`` record on their train messages."""
        groups: dict[SlotId, list[tuple[int, Task]]] = defaultdict(list)
        for node, task in pending.items():
            if is_secure(self.policy.layer(task.layer)):
                groups[task.slot].append((node, task))
        self.cohorts, self.by_node = {}, {}
        for slot, members in sorted(groups.items()):
            members.sort(key=lambda m: m[1].instance_id)
            cohort = Cohort(slot, self.policy.layer(slot.layer), members)
            self.cohorts[slot] = cohort
            for i, node in cohort.nodes.items():
                self.by_node[node] = (cohort, i)
        for msg in messages:
            found = self.by_node.get(msg.metadata.dst_node_id)
            if found is not None:
                msg.content.config_records[SECAGG] = found[0].setup(found[1]).to_record()

    def secure_nodes(self) -> set[int]:
        """Nodes whose tasks this round belong to secure slots."""
        return set(self.by_node)

    # -- the stages -------------------------------------------------------------------

    def run(self, grid: Grid, round_: int, replies: list[Message]) -> SecureRound:
        """Split off the secure replies, run the remaining stages, return the plain replies and sums.

        The stages' audit events come back with them (:attr:`SecureRound.events`), for
        the pipeline's recorder to write first.
        """
        plain = [r for r in replies if r.metadata.src_node_id not in self.by_node]
        self._events = []
        if not self.cohorts:
            return SecureRound(plain, {}, ())
        mine = {
            r.metadata.src_node_id: r for r in replies if r.metadata.src_node_id in self.by_node
        }
        for node, (cohort, i) in self.by_node.items():
            rec = self._answer(mine.get(node), cohort, i, "setup", round_)
            if rec is not None:
                self._take_keys(cohort, i, rec, round_)
        self._stage(grid, round_, "share_keys", self._share_keys_msg, self._share_keys_reply)
        self._stage(grid, round_, "collect", self._collect_msg, self._collect_reply)
        self._stage(grid, round_, "unmask", self._unmask_msg, self._unmask_reply)
        sums = {slot: self._finish(c, round_) for slot, c in self.cohorts.items()}
        return SecureRound(plain, sums, tuple(self._events))

    def _take_keys(self, cohort: Cohort, i: int, rec: ConfigRecord, round_: int) -> None:
        """Keep member ``i``'s public keys if its node identity signed them (refused otherwise)."""
        pk1, pk2 = rec.get("pk1"), rec.get("pk2")
        if not isinstance(pk1, bytes) or not isinstance(pk2, bytes):
            self._refuse(cohort, i, round_, "malformed", "secagg setup: expected pk1 and pk2 bytes")
            return
        why = signed_by_member(rec, keys_arrays(pk1, pk2), cohort.tasks[i], self.policy, round_)
        if why:
            self._refuse(cohort, i, round_, "unbound_key", f"secagg setup: keys {why}")
            return
        cohort.keys[i] = (pk1, pk2)

    def _answer(
        self, reply: Message | None, cohort: Cohort, i: int, stage: str, round_: int
    ) -> ConfigRecord | None:
        task = cohort.tasks[i]
        if reply is None or reply.has_error():
            cohort.unreachable.append(cohort.nodes[i])
            error = "no reply" if reply is None else str(reply.error.reason)[:300]
            self._events.append(
                event(
                    AuditKind.UPDATE_DROPPED,
                    round=round_,
                    instance=task.instance_id,
                    layer=task.layer,
                    error=f"secagg {stage}: {error}",
                )
            )
            return None
        record = reply.content.config_records.get(SECAGG)
        if record is None or record.get("stage") != stage:
            self._refuse(cohort, i, round_, "malformed", f"secagg {stage}: no {SECAGG} record")
            return None
        return record

    def _refuse(self, cohort: Cohort, i: int, round_: int, reason: str, detail: str) -> None:
        task = cohort.tasks[i]
        self._events.append(
            update_refused(round_, task.instance_id, task.layer, str(task.slot), reason, detail)
        )

    def _stage(self, grid: Grid, round_: int, stage: str, make: Any, take: Any) -> None:
        messages: list[Message] = []
        for cohort in self.cohorts.values():
            if cohort.reason:
                continue
            for i, record in make(cohort).items():
                record["key"] = round_key(cohort.tasks[i])  # the member kept its task at setup
                content = RecordDict({SECAGG: record})
                node = cohort.nodes[i]
                messages.append(Message(content, dst_node_id=node, message_type=SECAGG_MESSAGE))
        if not messages:
            return
        got = {
            r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=self.timeout)
        }
        for msg in messages:
            cohort, i = self.by_node[msg.metadata.dst_node_id]
            rec = self._answer(got.get(msg.metadata.dst_node_id), cohort, i, stage, round_)
            if rec is not None:
                try:
                    take(cohort, i, rec, got[msg.metadata.dst_node_id], round_)
                except (KeyError, TypeError, ValueError, LayerfedError) as e:
                    self._refuse(cohort, i, round_, "malformed", f"secagg {stage}: {e}")

    def _share_keys_msg(self, cohort: Cohort) -> dict[int, ConfigRecord]:
        if len(cohort.keys) < max(cohort.t, cohort.layer.min_clients):
            cohort.fail(f"too_many_dropouts: {len(cohort.keys)} of {cohort.n} sent keys")
            return {}
        ids = sorted(cohort.keys)
        record: dict[str, Any] = {
            "stage": "share_keys",
            "ids": ids,
            "pk1": [cohort.keys[i][0] for i in ids],
            "pk2": [cohort.keys[i][1] for i in ids],
        }
        return {i: ConfigRecord(dict(record)) for i in ids}

    def _share_keys_reply(
        self, cohort: Cohort, i: int, rec: ConfigRecord, reply: Message, round_: int
    ) -> None:
        dsts = [int(d) for d in cast(list[int], rec["dsts"])]
        texts = cast(list[bytes], rec["ciphertexts"])
        epk = rec["epk"]
        expected = set(cohort.keys) - {i}
        if sorted(dsts) != sorted(expected) or len(texts) != len(dsts):
            raise ValueError(f"expected one ciphertext for each of {sorted(expected)}, got {dsts}")
        if not all(isinstance(t, bytes) for t in texts) or not isinstance(epk, bytes):
            raise ValueError("expected the ephemeral key and ciphertexts as bytes")
        why = signed_by_member(
            rec, shares_arrays(epk, dsts, texts), cohort.tasks[i], self.policy, round_
        )
        if why:
            self._refuse(cohort, i, round_, "unsigned_shares", f"secagg share_keys: {why}")
            return
        cohort.shared.add(i)
        cohort.epks[i] = epk
        cohort.sent[i] = dict(zip(dsts, texts, strict=True))
        for dst, text in zip(dsts, texts, strict=True):
            cohort.routed[dst].append((i, text))

    def _collect_msg(self, cohort: Cohort) -> dict[int, ConfigRecord]:
        if len(cohort.shared) < max(cohort.t, cohort.layer.min_clients):
            cohort.fail(f"too_many_dropouts: {len(cohort.shared)} of {cohort.n} shared keys")
            return {}
        out = {}
        for i in sorted(cohort.shared):
            routed = [(s, t) for s, t in cohort.routed[i] if s in cohort.shared]
            out[i] = ConfigRecord(
                {
                    "stage": "collect",
                    "srcs": [s for s, _ in routed],
                    "epks": [cohort.epks[s] for s, _ in routed],
                    "ciphertexts": [t for _, t in routed],
                }
            )
        return out

    def _collect_reply(
        self, cohort: Cohort, i: int, rec: ConfigRecord, reply: Message, round_: int
    ) -> None:
        task = cohort.tasks[i]
        if not self._complaints(cohort, i, rec, round_):
            return
        envelope = envelope_from_dict(dict(reply.content.config_records[ENVELOPE]))
        arrays = arrays_from_record(reply.content.array_records[UPDATE], where=UPDATE)
        claim = (envelope.layer, envelope.slot_key, envelope.instance_id)
        if claim != (task.layer, task.slot.key, task.instance_id):
            self._refuse(cohort, i, round_, "forged_claim", f"got {'/'.join(claim)}")
            return
        check = check_update(
            envelope,
            arrays,
            self.policy,
            run_id=self.run_id,
            round=round_,
            replay_guard=ReplayGuard(),
        )
        if not check.ok:
            self._refuse(cohort, i, round_, check.reason or "refused", check.detail)
            return
        size = 1 + sum(math.prod(s) for s in self.stack.spec(cohort.slot).shapes().values())
        masked = arrays.get(MASKED)
        if (
            set(arrays) != {MASKED}
            or masked is None
            or masked.dtype != np.uint32
            or masked.shape != (size,)
        ):
            self._refuse(
                cohort, i, round_, "wrong_shape", f"expected one uint32 {MASKED} of {size}"
            )
            return
        cohort.masked[i] = (np.array(masked, dtype=np.uint32), envelope)

    def _complaints(self, cohort: Cohort, i: int, rec: ConfigRecord, round_: int) -> bool:
        """Judge member ``i``'s complaints; False when ``i`` itself is to blame."""
        srcs = [int(s) for s in cast(list[int], rec.get("blame", []))]
        if not srcs:
            return True
        texts = cast(list[bytes], rec["blame_texts"])
        sk2 = rec["sk2"]
        if len(texts) != len(srcs) or len(set(srcs)) != len(srcs) or not isinstance(sk2, bytes):
            raise ValueError(f"expected one distinct ciphertext per complaint, got {srcs}")
        verdicts = [
            judge_complaint(
                cohort.tasks[i],
                src,
                i,
                text,
                cohort.sent.get(src, {}).get(i) if src in cohort.shared else None,
                cohort.epks.get(src, b""),
                sk2,
                cohort.keys[i][1],
            )
            for src, text in zip(srcs, texts, strict=True)
        ]
        false = [v for v in verdicts if v.blamed == i]
        for verdict in false[:1] or verdicts:
            self._blame(cohort, verdict.blamed, round_, verdict.reason, verdict.detail)
        if false:
            return False
        cohort.unpaired.update((i, src) for src in srcs)
        return True

    def _blame(self, cohort: Cohort, who: int, round_: int, reason: str, detail: str) -> None:
        """Drop member ``who`` from this round's sum, audited by node and instance with ``reason``."""
        if who in cohort.blamed:
            return
        cohort.blamed[who] = reason
        task = cohort.tasks[who]
        log.warning("secagg: node %s (%s) blamed: %s", cohort.nodes[who], task.instance_id, detail)
        self._events.append(
            event(
                AuditKind.UPDATE_REFUSED,
                round=round_,
                instance=task.instance_id,
                layer=task.layer,
                slot=str(task.slot),
                reason=reason,
                detail=detail[:500],
                node=cohort.nodes[who],
            )
        )

    def _unmask_msg(self, cohort: Cohort) -> dict[int, ConfigRecord]:
        for who in cohort.blamed:
            cohort.masked.pop(who, None)
        survivors = len(cohort.masked)
        dropped = (cohort.n - survivors) / cohort.n
        if survivors < max(cohort.t, cohort.layer.min_clients):
            cohort.fail(f"too_many_dropouts: {survivors} of {cohort.n} sent masked updates")
        elif dropped > cohort.params.max_dropout_fraction + 1e-12:
            cohort.fail(
                f"too_many_dropouts: {dropped:.2f} of the cohort > {cohort.params.max_dropout_fraction:g}"
            )
        if cohort.reason:
            return {}
        active = sorted(cohort.masked)
        dead = sorted(cohort.shared - set(active))
        record: dict[str, Any] = {"stage": "unmask", "active": active, "dead": dead}
        return {i: ConfigRecord(dict(record)) for i in active}

    def _unmask_reply(
        self, cohort: Cohort, i: int, rec: ConfigRecord, reply: Message, round_: int
    ) -> None:
        ids = [int(x) for x in cast(list[int], rec["ids"])]
        shares = cast(list[bytes], rec["shares"])
        if len(ids) != len(shares):
            raise ValueError(f"expected one share per id, got {len(ids)} ids, {len(shares)} shares")
        if len(set(ids)) != len(ids) or not all(isinstance(x, bytes) for x in shares):
            raise ValueError(f"expected distinct ids and bytes shares, got {ids}")
        for owner, share in zip(ids, shares, strict=True):
            kind = "seed" if owner in cohort.masked else "key"
            cohort.shares[(kind, owner)].append((i, share))  # x-coordinate: who holds it

    # -- the sum --------------------------------------------------------------------

    def _finish(self, cohort: Cohort, round_: int) -> SecureSum:
        spec = self.stack.spec(cohort.slot)
        digests = {cohort.tasks[i].instance_id: env.ack_id for i, (_, env) in cohort.masked.items()}
        mean, weight = None, 0.0
        if not cohort.reason:
            try:
                mean, weight = unmask_sum(cohort, spec.shapes())
            except RefusedSumError as e:
                cohort.fail(str(e))
            except (ValueError, LayerfedError) as e:
                cohort.fail(f"unmask_failed: {e}")
        if cohort.reason:
            mean, digests = None, {}
        self._events.append(
            event(
                AuditKind.SECAGG,
                round=round_,
                slot=str(cohort.slot),
                cohort=cohort.n,
                keys=len(cohort.keys),
                shared=len(cohort.shared),
                masked=len(cohort.masked),
                threshold=cohort.t,
                blamed=sorted(cohort.tasks[b].instance_id for b in cohort.blamed),
                outcome=cohort.reason or "unmasked",
            )
        )
        return SecureSum(
            mean=mean,
            digests=digests,
            weight=weight,
            cohort=cohort.n,
            survivors=len(cohort.masked),
            reason=cohort.reason,
            unreachable=cohort.unreachable,
        )
