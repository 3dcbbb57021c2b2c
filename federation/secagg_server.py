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
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from layerfed.errors import LayerfedError
from layerfed.federation.events import AuditEvent, Events, event, update_refused
from layerfed.federation.secure_sum import SecureSum
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.envelope import ReplayGuard, check_update, envelope_from_dict
from layerfed.governance.schema import LayerPolicy, Policy, SecureAggregation
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack
from layerfed.wire.protocol import ENVELOPE, TASK, UPDATE, Task, arrays_from_record
from layerfed.wire.secagg import (
    MASKED,
    MODULUS_BITS,
    SECAGG,
    SECAGG_MESSAGE,
    SecAggSetup,
    decode_sum,
    mask_vector,
    pairwise_seed,
    sum_out_of_range,
    weight_factor,
)

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


class _RefusedSumError(ValueError):
    """The unmasked sum is not one honest members could have sent (the reason says why)."""


class _Cohort:
    """One secure slot's members this round and what each stage left of them."""

    def __init__(self, slot: SlotId, layer: LayerPolicy, members: list[tuple[int, Task]]) -> None:
        self.slot, self.layer = slot, layer
        privacy = layer.privacy
        assert privacy is not None
        self.params = privacy.secagg or SecureAggregation()
        self.clip_norm = privacy.clip_norm or 0.0
        self.tasks = {i + 1: task for i, (_, task) in enumerate(members)}
        self.nodes = {i + 1: node for i, (node, _) in enumerate(members)}
        self.n = len(members)
        self.t = max(2, math.ceil(self.params.threshold * self.n))
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.shared: set[int] = set()
        self.routed: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
        self.masked: dict[int, tuple[np.ndarray[Any, Any], Any]] = {}
        self.shares: dict[tuple[str, int], list[bytes]] = defaultdict(list)
        self.unreachable: list[int] = []
        self.reason = ""
        if self.n * (2**self.params.quantization_bits - 1) >= 2**MODULUS_BITS:
            self.fail(
                f"modulus_headroom: {self.n} members x 2^{self.params.quantization_bits} levels"
                f" would wrap mod 2^{MODULUS_BITS}"
            )

    def setup(self, i: int) -> SecAggSetup:
        local = self.layer.local
        return SecAggSetup(
            id=i,
            cohort=self.n,
            threshold=self.t,
            clip_range=self.params.clip_range,
            bits=self.params.quantization_bits,
            weight_cap=float(local.steps * local.batch_size),
            clip_norm=self.clip_norm,
        )

    def fail(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason


class SecAggServer:
    """Runs SecAgg+ for the secure slots of each round (see the module docstring)."""

    def __init__(self, policy: Policy, stack: LayerStack, run_id: str, timeout: float) -> None:
        self.policy, self.stack, self.run_id = policy, stack, run_id
        self.timeout = timeout
        self.cohorts: dict[SlotId, _Cohort] = {}
        self.by_node: dict[int, tuple[_Cohort, int]] = {}
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
            cohort = _Cohort(slot, self.policy.layer(slot.layer), members)
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
            if (
                rec is not None
                and isinstance(rec.get("pk1"), bytes)
                and isinstance(rec.get("pk2"), bytes)
            ):
                cohort.keys[i] = (cast(bytes, rec["pk1"]), cast(bytes, rec["pk2"]))
        self._stage(grid, round_, "share_keys", self._share_keys_msg, self._share_keys_reply)
        self._stage(grid, round_, "collect", self._collect_msg, self._collect_reply)
        self._stage(grid, round_, "unmask", self._unmask_msg, self._unmask_reply)
        sums = {slot: self._finish(c, round_) for slot, c in self.cohorts.items()}
        return SecureRound(plain, sums, tuple(self._events))

    def _answer(
        self, reply: Message | None, cohort: _Cohort, i: int, stage: str, round_: int
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

    def _refuse(self, cohort: _Cohort, i: int, round_: int, reason: str, detail: str) -> None:
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
                content = RecordDict({TASK: cohort.tasks[i].to_record(), SECAGG: record})
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

    def _share_keys_msg(self, cohort: _Cohort) -> dict[int, ConfigRecord]:
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
        self, cohort: _Cohort, i: int, rec: ConfigRecord, reply: Message, round_: int
    ) -> None:
        dsts = [int(d) for d in cast(list[int], rec["dsts"])]
        texts = cast(list[bytes], rec["ciphertexts"])
        expected = set(cohort.keys) - {i}
        if sorted(dsts) != sorted(expected) or len(texts) != len(dsts):
            raise ValueError(f"expected one ciphertext for each of {sorted(expected)}, got {dsts}")
        cohort.shared.add(i)
        for dst, text in zip(dsts, texts, strict=True):
            cohort.routed[dst].append((i, text))

    def _collect_msg(self, cohort: _Cohort) -> dict[int, ConfigRecord]:
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
                    "ciphertexts": [t for _, t in routed],
                }
            )
        return out

    def _collect_reply(
        self, cohort: _Cohort, i: int, rec: ConfigRecord, reply: Message, round_: int
    ) -> None:
        task = cohort.tasks[i]
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

    def _unmask_msg(self, cohort: _Cohort) -> dict[int, ConfigRecord]:
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
        self, cohort: _Cohort, i: int, rec: ConfigRecord, reply: Message, round_: int
    ) -> None:
        ids = [int(x) for x in cast(list[int], rec["ids"])]
        shares = cast(list[bytes], rec["shares"])
        if len(ids) != len(shares):
            raise ValueError(f"expected one share per id, got {len(ids)} ids, {len(shares)} shares")
        for owner, share in zip(ids, shares, strict=True):
            kind = "seed" if owner in cohort.masked else "key"
            cohort.shares[(kind, owner)].append(share)

    # -- the sum --------------------------------------------------------------------

    def _finish(self, cohort: _Cohort, round_: int) -> SecureSum:
        spec = self.stack.spec(cohort.slot)
        digests = {cohort.tasks[i].instance_id: env.ack_id for i, (_, env) in cohort.masked.items()}
        mean, weight = None, 0.0
        if not cohort.reason:
            try:
                mean, weight = self._unmask(cohort, spec.shapes())
            except _RefusedSumError as e:
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

    def _secret(self, cohort: _Cohort, kind: str, owner: int) -> bytes:
        shares = cohort.shares.get((kind, owner), [])
        if len(shares) < cohort.t:
            raise ValueError(f"expected {cohort.t} shares of {kind} {owner}, got {len(shares)}")
        return combine_shares(shares[: cohort.t])

    def _unmask(
        self, cohort: _Cohort, shapes: dict[str, tuple[int, ...]]
    ) -> tuple[dict[str, np.ndarray[Any, Any]], float]:
        vectors = [v for v, _ in cohort.masked.values()]
        total = np.zeros_like(vectors[0])
        for vector in vectors:
            total += vector
        zero = np.zeros_like(total)
        for a in cohort.masked:
            total -= mask_vector(zero, self._secret(cohort, "seed", a), [], a)
        for d in sorted(cohort.shared - set(cohort.masked)):
            key = bytes_to_private_key(self._secret(cohort, "key", d))
            for a in cohort.masked:
                seed = pairwise_seed(
                    generate_shared_key(key, bytes_to_public_key(cohort.keys[a][0]))
                )
                total -= mask_vector(zero, b"", [(d, seed)], a)
        params = cohort.params
        cap = float(cohort.layer.local.steps * cohort.layer.local.batch_size)
        factors = [
            weight_factor(env.num_examples, cap, params.quantization_bits)
            for _, env in cohort.masked.values()
        ]
        claimed = sum(factors)
        if int(total[0]) != claimed:
            raise ValueError(
                f"weight_mismatch: expected weight factors {claimed}, got {int(total[0])}"
            )
        if claimed == 0:
            raise ValueError("no_weight: every survivor trained on nothing")
        outside = sum_out_of_range(total, factors, params.quantization_bits, params.clip_range)
        if outside:
            raise _RefusedSumError(outside)
        return decode_sum(total, len(vectors), shapes, params.quantization_bits, params.clip_range)
