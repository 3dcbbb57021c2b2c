"""The Instance API: one deployed copy of the model, as a deployer embeds it.

An :class:`Instance` composes its slots (creator ... its own individual slot) on a
:class:`~layerfed.layers.LayerStack`, generates with per-token top-k alternatives
(through the output guard when the policy asks for it), appends typed feedback to
its durable :class:`~layerfed.clients.journal.FeedbackJournal`, trains one of its
slots on a batch of that feedback with the superego's reinforcement, and signs the
update. It never opens a connection itself: the Flower ClientApp
(:mod:`layerfed.clients.client_app`) moves tasks, slots and signed updates.

The instance is the one driver of its journal's batch state machine (open, sign,
consume, release): its SDK calls (:meth:`Instance.update`, :meth:`Instance.acknowledge`),
a federated round (:meth:`Instance.run_round`), the local commit of the slots whose
updates never leave it (:meth:`Instance.commit_local`) and secure aggregation's
masked update (:meth:`Instance.sign_masked`). Whoever writes feedback (a person's
page, the gym's simulated people) does so through :meth:`Instance.feedback` or
:meth:`Instance.feedback_many`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from transformers import PreTrainedTokenizerBase

from layerfed.clients.config import InstanceConfig, load_certificates, verified_instance_policy
from layerfed.clients.events import FeedbackEvent, parse_event
from layerfed.clients.generation import Generation, generate
from layerfed.clients.guard import OutputGuard
from layerfed.clients.instance_errors import InstanceError, NoFeedback
from layerfed.clients.instance_rounds import FederatedRounds, RoundUpdate
from layerfed.clients.journal import FeedbackJournal, JournalEntry
from layerfed.clients.local_train import TrainResult, check_event, train_on_events
from layerfed.clients.routing import RoleError, Route, Router
from layerfed.clients.signer import UpdateSigner
from layerfed.clients.superego import Judge, Superego
from layerfed.clients.synced import SYNCED_DIR, SyncedSlots
from layerfed.governance.envelope import InstanceCertificate, UpdateEnvelope
from layerfed.governance.keys import load_private_key
from layerfed.governance.schema import Policy
from layerfed.layers.arrays import Arrays
from layerfed.layers.base import load_base
from layerfed.layers.protect_check import verify_stored_slots
from layerfed.layers.slots import SlotId, policy_layer, slots_for_instance
from layerfed.layers.stack import LayerStack
from layerfed.layers.store import SlotStore

__all__ = ["Instance", "InstanceError", "NoFeedback", "RoleError", "RoundUpdate", "Route"]

log = logging.getLogger("layerfed")


@dataclass
class _Pending:
    """The summed, not yet signed delta of one slot and how many journal events it used."""

    delta: Arrays
    num_events: int


class Instance(FederatedRounds):
    """One deployed model instance: its slots, feedback journal, local training, signed updates.

    ``base`` is ``(model, tokenizer)``; when omitted the policy's ``base_model`` is
    loaded (``root`` resolves a relative path). ``stack`` shares an existing layer
    stack instead (a ClientApp serving many simulated instances in one process).
    ``store`` supplies the latest version of each slot. ``journal`` is the durable
    feedback store (default: in memory). ``key`` signs updates: as the certified
    instance key when a certificate for the slot's layer is given (``certificate``
    or ``certificates`` by layer), else as the policy principal whose key it is.
    ``layers`` are the layers the instance feeds (default: all of the policy's) and
    ``people`` a person id -> roles map (the instance config's ``[people]``): feedback is
    routed to a layer by the policy's roles (:mod:`layerfed.clients.routing`).
    """

    def __init__(
        self,
        policy: Policy,
        *,
        instance_id: str,
        jurisdiction: str | None = None,
        groups: Sequence[str] = (),
        store: SlotStore | None = None,
        base: tuple[torch.nn.Module, PreTrainedTokenizerBase] | None = None,
        stack: LayerStack | None = None,
        journal: FeedbackJournal | None = None,
        key: Ed25519PrivateKey | None = None,
        certificate: InstanceCertificate | None = None,
        certificates: Mapping[str, InstanceCertificate] | None = None,
        seed: int = 0,
        root_seed: int = 0,
        judge: Judge | None = None,
        guard: OutputGuard | None = None,
        root: Path | None = None,
        layers: Sequence[str] | None = None,
        people: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.policy = policy
        self.router = Router(policy, layers, people)
        self.instance_id = instance_id
        self.jurisdiction = jurisdiction
        self.groups = tuple(groups)
        self.seed = seed
        self.tokenizer: Any
        if stack is not None:
            self.stack, self.tokenizer = stack, stack.tokenizer
        else:
            model, self.tokenizer = (
                base if base is not None else load_base(policy.base_model, root=root)
            )
            digest = store.redline_digest() if store is not None else None
            self.stack = LayerStack(
                policy, model, self.tokenizer, root_seed, expected_redline_digest=digest
            )
        self.slots = slots_for_instance(policy, instance_id, jurisdiction, groups)
        self.versions: dict[str, int] = {str(s): 0 for s in self.slots}
        if stack is None:
            self.stack.activate(self.slots)
            if store is not None:
                self._load(store)
        self.journal = journal if journal is not None else FeedbackJournal(None)
        self._judge = judge
        self._superego: Superego | None = None
        self._superego_ready = False
        self.guard = guard or (
            OutputGuard.from_policy(policy, self.tokenizer)
            if policy.red_lines.output_guard
            else None
        )
        certs = dict(certificates or {})
        if certificate is not None:
            certs.setdefault(certificate.layer, certificate)
        self._signer = UpdateSigner(policy, instance_id, key, certs)
        self._pending: dict[SlotId, _Pending] = {}
        self._last: SlotId | None = None
        self._train_calls = 0
        self._generations = 0
        self.guard_blocks = 0

    @classmethod
    def from_config(cls, config: InstanceConfig | str | Path, *, seed: int = 0) -> Instance:
        """A standalone instance from its config (a page, a script): own model, journal, keys.

        ``seed`` is the federation's seed (its slots' frozen A matrices), as in the run config.
        The newest shared slot versions its node saved (``<state>/synced``,
        :mod:`layerfed.clients.synced`) are composed; :attr:`versions` are the server's.
        """
        cfg = config if isinstance(config, InstanceConfig) else InstanceConfig.load(config)
        policy = verified_instance_policy(cfg)
        base = load_base(
            cfg.model or policy.base_model,
            root=cfg.policy.parent,
            device=cfg.device,
            dtype=cfg.dtype,
        )
        journal_path = cfg.journal or (cfg.state / "journal.sqlite" if cfg.state else None)
        if journal_path is not None:
            journal_path.parent.mkdir(parents=True, exist_ok=True)
        node = cfg.instance
        synced = cfg.state / SYNCED_DIR if cfg.state is not None else None
        return cls(
            policy,
            instance_id=node.id,
            jurisdiction=node.jurisdiction,
            groups=node.groups,
            store=SlotStore(synced) if synced is not None and SyncedSlots.exists(synced) else None,
            base=base,
            root_seed=seed,
            journal=FeedbackJournal(journal_path),
            key=load_private_key(cfg.key) if cfg.key is not None else None,
            certificates=load_certificates(cfg.certificates),
            layers=node.layers,
            people=cfg.people,
        )

    # -- model ------------------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        """The composed model (base + every active slot)."""
        return self.stack.model

    @property
    def superego(self) -> Superego | None:
        """The frozen teacher of this instance (built on first use: it copies the model)."""
        if not self._superego_ready:
            self._superego = Superego.from_policy(
                self.policy, self.stack, self.tokenizer, judge=self._judge, seed=self.seed
            )
            self._superego_ready = True
        return self._superego

    def generate(
        self, prompt: str, max_new_tokens: int = 8, top_k: int = 5, temperature: float = 0.0
    ) -> Generation:
        """Continue ``prompt``: text, token ids and each position's top-k ``(id, logprob)``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self._generations)
        self._generations += 1
        out = generate(
            self.model,
            self.tokenizer,
            prompt,
            max_new_tokens=max_new_tokens,
            top_k=top_k,
            temperature=temperature,
            guard=self.guard,
            generator=generator,
        )
        self.guard_blocks += int(out.guarded)
        return out

    # -- feedback ---------------------------------------------------------------------

    @property
    def events(self) -> tuple[FeedbackEvent, ...]:
        """Every event in the journal, oldest first (pending, batched and consumed)."""
        return tuple(entry.event for entry in self.journal.entries())

    def route(self, role: str | None = None, person: str | None = None) -> Route:
        """The role and the layer feedback given by ``person`` in ``role`` trains here.

        No role and no person: a person's own feedback (role ``everyone``). The policy's
        roles decide the layer; :class:`RoleError` (field, expected, got) for a role or
        person the policy or this instance does not route.
        """
        return self.router.route(role, person)

    def feedback(
        self,
        event: FeedbackEvent | Mapping[str, Any],
        *,
        role: str | None = None,
        person: str | None = None,
    ) -> int:
        """Check one event and append it to the journal (durable before this returns).

        The event trains the layer :meth:`route` gives for ``role``/``person`` (recorded
        with it). Returns the event's journal sequence number; :class:`InvalidFeedback`
        or :class:`RoleError` if bad (nothing is written then, nothing before touched).
        """
        return self.feedback_many([event], role=role, person=person)[0]

    def feedback_many(
        self,
        events: Sequence[FeedbackEvent | Mapping[str, Any]],
        *,
        role: str | None = None,
        person: str | None = None,
    ) -> list[int]:
        """Check every event, then append them all in one durable commit; their sequence numbers.

        Every event is given in the same role (see :meth:`feedback`). :class:`InvalidFeedback`
        names the first bad event's field; nothing is written then.
        """
        route = self.router.route(role, person)
        parsed = [parse_event(e) if isinstance(e, Mapping) else e for e in events]
        vocab = int(self.model.get_output_embeddings().weight.shape[0])  # type: ignore[operator]
        for event in parsed:
            check_event(self.tokenizer, event, vocab)
        return self.journal.append_many(parsed, layer=route.layer, role=route.role)

    def entries(self) -> list[JournalEntry]:
        """Every journal entry, oldest first, each with the layer it trains and its role."""
        return self.journal.entries()

    def pending_by_layer(self) -> dict[str, int]:
        """Pending events per layer they train (rows from before routing count as own)."""
        counts: dict[str, int] = {}
        for entry in self.journal.pending():
            layer = entry.layer or self.router.own_layer or "unrouted"
            counts[layer] = counts.get(layer, 0) + 1
        return counts

    # -- local training (SDK use without a server) --------------------------------------

    def slot_for(self, layer: str | None = None, key: str | None = None) -> SlotId:
        """This instance's slot of ``layer`` (default: its per-instance layer)."""
        name = layer or self._own_layer()
        found = [s for s in self.slots if s.layer == name and (key is None or s.key == key)]
        if len(found) != 1:
            mine = [str(s) for s in self.slots]
            raise InstanceError("layer", f"exactly one of this instance's slots {mine}", name)
        return found[0]

    def train(
        self, layer: str | None = None, steps: int | None = None, *, key: str | None = None
    ) -> TrainResult:
        """Train this instance's slot of ``layer`` on the pending events routed to it; keep it.

        The events stay pending in the journal until :meth:`update` signs the delta
        (then they form a batch, consumed when the server acknowledges it).
        """
        slot = self.slot_for(layer, key)
        name, unrouted = self.router.selects(slot.layer)
        events = [entry.event for entry in self.journal.pending(layer=name, unrouted=unrouted)]
        report = train_on_events(
            self.stack,
            slot,
            policy_layer(self.policy, slot),
            self.tokenizer,
            events,
            seed=self.seed * 7919 + self._train_calls,
            steps=steps,
            superego=self.superego,
            keep=True,
        )
        self._train_calls += 1
        old = self._pending.get(slot)
        if old is None:
            self._pending[slot] = _Pending(dict(report.delta), report.num_events)
        else:
            summed = {k: old.delta[k] + report.delta[k] for k in report.delta}
            self._pending[slot] = _Pending(summed, max(old.num_events, report.num_events))
        self._last = slot
        return report

    def update(
        self, run_id: str, round: int, layer: str | None = None, *, key: str | None = None
    ) -> tuple[UpdateEnvelope, Arrays]:
        """Sign the slot's delta since the last update (default: the last trained slot).

        The events it was trained on become a journal batch of ``(run_id, round)``
        signed with the envelope's digest. Whether the arrays may leave the instance
        is the layer's ``updates_leave_instance``.
        """
        slot = self._last if layer is None and self._last is not None else self.slot_for(layer, key)
        pending = self._pending.pop(slot, None)
        if pending is None:
            raise InstanceError("update", f"a trained slot {slot} since the last update", None)
        envelope = self._signer.sign(pending.delta, run_id, round, slot, pending.num_events)
        name, unrouted = self.router.selects(slot.layer)
        batch = self.journal.open_batch(
            run_id, round, str(slot), limit=pending.num_events, layer=name, unrouted=unrouted
        )
        self.journal.sign_batch(batch.id, envelope.ack_id)
        return envelope, pending.delta

    def sync(
        self,
        slot_arrays: Mapping[str, Mapping[str, np.ndarray[Any, Any]]],
        versions: Mapping[str, int],
    ) -> None:
        """Apply new slot versions (``"layer/key" -> arrays``); all checked before any change."""
        plan: list[tuple[SlotId, Mapping[str, np.ndarray[Any, Any]], int]] = []
        for name, arrays in slot_arrays.items():
            slot = self._own_slot(name)
            if name not in versions:
                raise InstanceError(f"versions[{name!r}]", "the version of every synced slot", None)
            version = int(versions[name])
            if version < self.versions[name]:
                expected = f"a version >= {self.versions[name]} (no rollback)"
                raise InstanceError(f"versions[{name!r}]", expected, version)
            self.stack.spec(slot).check(arrays)
            plan.append((slot, arrays, version))
        for slot, arrays, version in plan:
            self.stack.set_arrays(slot, arrays)
            self.versions[str(slot)] = version
            self._pending.pop(slot, None)
        log.info("instance %s synced %s", self.instance_id, [str(s) for s, _, _ in plan])

    def decay(self, rounds: float = 1.0, seconds: float = 0.0) -> None:
        """Let the memories of this instance's own (per-instance) slots fade.

        Memories with a half-life in rounds fade by ``rounds``, those whose half-life is
        a duration (``"6h"``) by ``seconds`` of wall-clock time.
        """
        for slot in self.slots:
            if policy_layer(self.policy, slot).slot_key == "instance":
                self.stack.decay(slot, rounds=rounds, seconds=seconds)

    def metrics(self) -> dict[str, float]:
        """Counters: journal events by status, superego and guard interventions."""
        ego = self._superego
        counts = self.journal.counts()
        return {
            "events": float(sum(counts.values())),
            "events_pending": float(counts.get("pending", 0)),
            "superego_steps": float(ego.consultations if ego else 0),
            "superego_interventions": float(ego.interventions if ego else 0),
            "guard_blocks": float(self.guard_blocks),
            "generations": float(self._generations),
        }

    # -- internals --------------------------------------------------------------------

    def _own_layer(self) -> str:
        own = [layer.name for layer in self.policy.layers if layer.slot_key == "instance"]
        if not own:
            raise InstanceError(
                "layer", "a layer name (the policy has no per-instance layer)", None
            )
        return own[0]

    def _own_slot(self, name: str) -> SlotId:
        for slot in self.slots:
            if str(slot) == name:
                return slot
        raise InstanceError("slot_arrays", f"a slot of this instance {list(self.versions)}", name)

    def _load(self, store: SlotStore) -> None:
        for slot in self.slots:
            if not store.versions(slot):
                continue
            spec = store.spec(slot)
            if spec.a_seed != self.stack.a_seed(slot):
                expected = f"A seed {self.stack.a_seed(slot)} (same root_seed as the store)"
                raise InstanceError(f"store {slot}", expected, spec.a_seed)
            latest = {str(slot): {"version": store.versions(slot)[-1]}}
            verify_stored_slots(store, latest, self.stack.spec)  # A = seed + red-line basis
            self.stack.set_arrays(slot, store.load(slot))
            info = store.record(slot).get("info", {})  # a synced slot: the server's version
            self.versions[str(slot)] = int(info.get("version", store.versions(slot)[-1]))
