"""An instance's federated rounds: the one driver of its journal's batch state machine.

:class:`FederatedRounds` is the part of :class:`~layerfed.clients.instance.Instance`
a round goes through. :meth:`~FederatedRounds.run_round` is the ClientApp's whole
round: settle batches a crash left, compose the instance's slots, train the task's
slot on one batch of the pending feedback routed to its layer
(:meth:`~FederatedRounds.train_round`), sign it, unmount, and for a slot whose
updates never leave the instance take the server's step and commit it locally
(:meth:`~FederatedRounds.commit_local`). In the same round every other slot of a
layer whose updates never leave the instance trains on the feedback routed to it and
commits locally: those events never leave the node, whatever the server asked for
(:attr:`RoundUpdate.local`). Batches are opened,
signed, consumed and released only here (and by the SDK's
:meth:`~layerfed.clients.instance.Instance.update`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from layerfed.clients.events import Demonstration
from layerfed.clients.instance_errors import InstanceError, NoFeedback
from layerfed.clients.journal import FeedbackJournal
from layerfed.clients.local_dp import privatise
from layerfed.clients.local_slots import LocalSlots
from layerfed.clients.local_train import TrainResult, train_on_events
from layerfed.clients.routing import Router
from layerfed.clients.signer import UpdateSigner
from layerfed.clients.superego import Superego
from layerfed.governance.envelope import UpdateEnvelope
from layerfed.governance.schema import LayerPolicy, Policy
from layerfed.layers.arrays import Arrays
from layerfed.layers.slots import SlotId, policy_layer
from layerfed.layers.stack import LayerStack

__all__ = ["PARKING_KEY", "FederatedRounds", "RoundUpdate", "TrainPlan"]

log = logging.getLogger("layerfed")
PARKING_KEY = "idle"
"""Key of the placeholder slot of the top layer a shared stack composes between rounds
when no shared slot is left to compose (a stack always composes at least one slot)."""


@dataclass(frozen=True)
class TrainPlan:
    """How to train this round: the seed, and a layer policy override (the gym's adversaries)."""

    seed: int
    layer: LayerPolicy | None = None
    noise_seed: int | None = None
    """Seed of local DP noise (the gym, for reproducible runs); None: from the operating system."""


@dataclass(frozen=True)
class RoundUpdate:
    """One federated round's work: the signed envelope, the arrays it covers, the training."""

    envelope: UpdateEnvelope
    arrays: Arrays
    result: TrainResult
    batch_id: str
    committed_locally: bool = False
    """True when the slot's updates never leave the instance and it committed the step itself."""
    local: tuple[TrainResult, ...] = ()
    """The round's other trainings: slots whose updates never leave the instance, trained on
    the feedback routed to them and committed here (nothing of them is in the reply)."""


class FederatedRounds:
    """Federated rounds of an instance (mixed into :class:`~layerfed.clients.instance.Instance`)."""

    policy: Policy
    instance_id: str
    slots: list[SlotId]
    router: Router
    journal: FeedbackJournal
    stack: LayerStack
    tokenizer: Any
    _signer: UpdateSigner

    @property
    def superego(self) -> Superego | None:
        """The instance's frozen teacher (the instance builds it)."""
        raise NotImplementedError

    def acknowledge(self, run_id: str, accepted: Sequence[str], before_round: int) -> None:
        """Settle earlier batches: digests the server accepted are consumed, others released."""
        consumed, released = self.journal.reconcile(run_id, accepted, before_round)
        if consumed or released:
            log.info(
                "instance %s: %s batches consumed, %s released",
                self.instance_id,
                consumed,
                released,
            )

    def train_round(
        self,
        run_id: str,
        round: int,
        slot: SlotId,
        *,
        seed: int,
        layer: LayerPolicy | None = None,
        acks: Sequence[str] = (),
        noise_seed: int | None = None,
    ) -> RoundUpdate:
        """Train ``slot`` on one batch of the pending feedback routed to its layer; sign it.

        Earlier batches are settled first (``acks``: digests the server accepted).
        The batch is idempotent per ``(run_id, round, slot)``: a replay after a crash
        trains the same events, never new ones twice. ``layer`` overrides the slot's
        layer policy (the gym's adversaries ignore local budgets and caps). The
        caller composes the slots on the stack first (:meth:`mount`). A ``local_dp``
        layer's delta is clipped and noised before signing (``noise_seed``: None
        draws it from the operating system).
        """
        self.acknowledge(run_id, acks, round)
        rules = layer if layer is not None else policy_layer(self.policy, slot)
        budget = rules.local.steps * rules.local.batch_size if layer is None else None
        name, unrouted = self.router.selects(slot.layer)
        batch = self.journal.open_batch(
            run_id,
            round,
            str(slot),
            limit=self._one_kind(budget, slot.layer),
            layer=name,
            unrouted=unrouted,
        )
        if not batch.events:
            self.journal.release(batch.id)
            raise NoFeedback("journal", "pending feedback to train on", "none")
        result = train_on_events(
            self.stack,
            slot,
            rules,
            self.tokenizer,
            list(batch.events),
            seed=seed,
            superego=self.superego,
        )
        result = dataclasses.replace(
            result, delta=privatise(result.delta, rules, slot, round, noise_seed)
        )
        leaves = policy_layer(self.policy, slot).updates_leave_instance
        arrays = result.delta if leaves else {}
        envelope = self._signer.sign(arrays, run_id, round, slot, result.num_events)
        self.journal.sign_batch(batch.id, envelope.ack_id)
        return RoundUpdate(envelope, arrays, result, batch.id)

    def run_round(
        self,
        run_id: str,
        round: int,
        slot: SlotId,
        received: Mapping[SlotId, Arrays],
        local: LocalSlots,
        plan: TrainPlan,
        *,
        acks: Sequence[str] = (),
    ) -> RoundUpdate:
        """One federated round on a (possibly shared) stack, start to finish.

        Settles batches of instance-only slots a crash left (:meth:`settle_local`),
        composes every slot of the instance (``received``: the arrays the server sent
        or the node cached for the slots that leave the instance; ``local`` holds the
        others, decayed since their last commit), trains ``slot`` as ``plan`` says
        (:meth:`train_round`),
        unmounts the slots only this instance uses, and commits ``slot`` locally
        (:meth:`commit_local`) when its updates never leave the instance.
        """
        self.settle_local(run_id, round, local)
        current = {s: local.load(s, round) if local.owns(s) else received[s] for s in self.slots}
        own = [s for s in self._local_slots(local) if s != slot]
        try:
            update = self._one_slot(run_id, round, slot, current, local, plan, acks)
        except NoFeedback:
            self._train_local(run_id, round, own, current, local, plan, acks)
            raise
        trained = self._train_local(run_id, round, own, current, local, plan, acks)
        return dataclasses.replace(update, local=trained)

    def _one_slot(
        self,
        run_id: str,
        round: int,
        slot: SlotId,
        current: dict[SlotId, Arrays],
        local: LocalSlots,
        plan: TrainPlan,
        acks: Sequence[str],
    ) -> RoundUpdate:
        """Compose, train ``slot`` as ``plan`` says, unmount; commit it locally if it stays."""
        # A slot whose B is all zero adds nothing to the forward pass: compose only the others.
        composed = [s for s in self.slots if s == slot or any(a.any() for a in current[s].values())]
        self.mount({s: current[s] for s in composed})
        try:
            update = self.train_round(
                run_id,
                round,
                slot,
                seed=plan.seed,
                layer=plan.layer,
                acks=acks,
                noise_seed=plan.noise_seed,
            )
        finally:
            self._unmount(composed)
        if local.owns(slot):
            current[slot] = self.commit_local(update, local, current)
            update = dataclasses.replace(update, committed_locally=True)
        return update

    def _local_slots(self, local: LocalSlots) -> list[SlotId]:
        """This instance's slots whose updates never leave it, of layers it feeds."""
        return [s for s in self.slots if local.owns(s) and s.layer in self.router.layers]

    def _train_local(
        self,
        run_id: str,
        round: int,
        slots: Sequence[SlotId],
        current: dict[SlotId, Arrays],
        local: LocalSlots,
        plan: TrainPlan,
        acks: Sequence[str],
    ) -> tuple[TrainResult, ...]:
        """Train and commit each of ``slots`` that has feedback routed to it (the task's own
        plan, its seeds moved on per slot, without the task's layer override)."""
        done: list[TrainResult] = []
        for i, slot in enumerate(slots, start=1):
            name, unrouted = self.router.selects(slot.layer)
            if not self.journal.pending(1, layer=name, unrouted=unrouted):
                continue
            noise = None if plan.noise_seed is None else plan.noise_seed + i
            step = TrainPlan((plan.seed + 7919 * i) % 2**32, None, noise)
            done.append(self._one_slot(run_id, round, slot, current, local, step, acks).result)
            log.info("instance %s: trained %s locally in round %s", self.instance_id, slot, round)
        return tuple(done)

    def commit_local(
        self, update: RoundUpdate, local: LocalSlots, current: Mapping[SlotId, Arrays]
    ) -> Arrays:
        """Commit an instance-only slot's round: one server step, saved; its batch consumed.

        ``current`` holds the round's arrays of the instance's slots. The slot moves by
        its layer's ``server_lr`` along the update's delta (:func:`~layerfed.layers.arrays.server_step`
        and :func:`~layerfed.layers.arrays.apply_step`, as on the server), every
        instance-only slot is written to ``local``'s disk as the round's commit, and
        the journal batch the update was trained on is consumed. Returns the slot's
        new arrays.
        """
        slot, round = update.result.slot, update.envelope.round
        if not local.owns(slot):
            expected = "a slot of a layer whose updates stay on the instance"
            raise InstanceError("update.slot", expected, str(slot))
        committed = local.commit(round, current, slot, update.result.delta)
        self.journal.consume(update.batch_id)
        return committed

    def settle_local(self, run_id: str, round: int, local: LocalSlots) -> None:
        """Live batches of instance-only slots from earlier rounds, left by a crash: each is
        consumed iff its round of this run was committed to ``local``'s disk, else released."""
        saved = local.saved_rounds()
        for batch in self.journal.batches():
            if batch.state not in ("open", "signed") or batch.round >= round:
                continue
            if not local.owns(SlotId.parse(batch.slot)):
                continue
            if batch.run_id == run_id and batch.round in saved:
                self.journal.consume(batch.id)
            else:
                self.journal.release(batch.id)

    def sign_masked(
        self,
        arrays: Arrays,
        run_id: str,
        round: int,
        slot: SlotId,
        num_examples: int,
        batch_id: str,
    ) -> UpdateEnvelope:
        """Sign secure aggregation's masked vector as this instance's update of ``slot``.

        The journal batch the round trained on (if still live) records this envelope's
        acknowledgement id, so the server's acknowledgement of the masked update settles it.
        """
        envelope = self._signer.sign(arrays, run_id, round, slot, num_examples)
        if any(b.id == batch_id for b in self.journal.batches()):
            self.journal.sign_batch(batch_id, envelope.ack_id)
        return envelope

    def _one_kind(self, budget: int | None, layer: str) -> int | None:
        """``budget`` cut so a batch never mixes demonstrations with other kinds.

        Demonstrations train supervised, the others with preference losses; a batch is
        the oldest pending events up to the first change between the two (the rest wait
        for the next round, in order).
        """
        name, unrouted = self.router.selects(layer)
        pending = [
            e.event for e in self.journal.pending(limit=budget, layer=name, unrouted=unrouted)
        ]
        if not pending:
            return budget
        demo = isinstance(pending[0], Demonstration)
        return next(
            (i for i, e in enumerate(pending) if isinstance(e, Demonstration) != demo),
            len(pending),
        )

    def mount(self, slot_arrays: Mapping[SlotId, Arrays]) -> None:
        """Compose exactly these slots at these arrays on the (shared) stack."""
        self.stack.activate(list(slot_arrays))
        for slot, arrays in slot_arrays.items():
            self.stack.set_arrays(slot, arrays)

    def _unmount(self, slots: Sequence[SlotId]) -> None:
        """Keep shared slots composed on the stack; evict this instance's own ones.

        Many instances share one stack in a simulation: instance-keyed slots are
        dropped (their adapters recycled) so they do not pile up. With no shared slot
        left, the top layer's global slot (or a placeholder, :data:`PARKING_KEY`) stays.
        """
        shared = [s for s in slots if policy_layer(self.policy, s).slot_key != "instance"]
        top = self.policy.layers_by_rank()[0]
        parked = SlotId(top.name, "global" if top.slot_key == "global" else PARKING_KEY)
        self.stack.activate(shared or [parked])
        for slot in slots:
            if slot not in shared:
                self.stack.evict(slot, recycle=True)
