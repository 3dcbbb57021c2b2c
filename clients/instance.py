"""The Instance API: one deployed copy of the model, as a deployer embeds it.

An :class:`Instance` composes its slots (creator ... its own individual slot) on a
:class:`~layerfed.layers.LayerStack`, generates with per-token top-k alternatives
(through the output guard when the policy asks for it), appends typed feedback to
its durable :class:`~layerfed.clients.journal.FeedbackJournal`, trains one of its
slots on a batch of that feedback with the superego's reinforcement, and signs the
update. It never opens a connection itself: the Flower ClientApp
(:mod:`layerfed.clients.client_app`) moves tasks, slots and signed updates.
"""

from __future__ import annotations

import dataclasses
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
from layerfed.clients.events import Demonstration, FeedbackEvent, FieldError, parse_event
from layerfed.clients.generation import Generation, generate
from layerfed.clients.guard import OutputGuard
from layerfed.clients.journal import FeedbackJournal
from layerfed.clients.local_dp import privatise
from layerfed.clients.local_train import TrainResult, check_event, train_on_events
from layerfed.clients.superego import Judge, Superego
from layerfed.governance.envelope import InstanceCertificate, UpdateEnvelope, sign_update
from layerfed.governance.keys import load_private_key, public_key_string
from layerfed.governance.schema import LayerPolicy, Policy
from layerfed.layers.arrays import Arrays
from layerfed.layers.base import load_base
from layerfed.layers.slots import SlotId, policy_layer, slots_for_instance
from layerfed.layers.stack import LayerStack
from layerfed.layers.store import SlotStore

__all__ = ["Instance", "InstanceError", "NoFeedback", "RoundUpdate"]

log = logging.getLogger("layerfed")


class InstanceError(FieldError):
    """An instance was asked for something its policy, slots or keys do not allow."""


class NoFeedback(InstanceError):  # noqa: N818 (a condition, not a failure)
    """A round found no pending feedback in the journal: nothing to train, nothing to send."""


@dataclass
class _Pending:
    """The summed, not yet signed delta of one slot and how many journal events it used."""

    delta: Arrays
    num_events: int


@dataclass(frozen=True)
class RoundUpdate:
    """One federated round's work: the signed envelope, the arrays it covers, the training."""

    envelope: UpdateEnvelope
    arrays: Arrays
    result: TrainResult
    batch_id: str


class Instance:
    """One deployed model instance: its slots, feedback journal, local training, signed updates.

    ``base`` is ``(model, tokenizer)``; when omitted the policy's ``base_model`` is
    loaded (``root`` resolves a relative path). ``stack`` shares an existing layer
    stack instead (a ClientApp serving many simulated instances in one process).
    ``store`` supplies the latest version of each slot. ``journal`` is the durable
    feedback store (default: in memory). ``key`` signs updates: as the certified
    instance key when a certificate for the slot's layer is given (``certificate``
    or ``certificates`` by layer), else as the policy principal whose key it is.
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
    ) -> None:
        self.policy = policy
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
        self._key = key
        self._certificates = dict(certificates or {})
        if certificate is not None:
            self._certificates.setdefault(certificate.layer, certificate)
        self._pending: dict[SlotId, _Pending] = {}
        self._last: SlotId | None = None
        self._train_calls = 0
        self._generations = 0
        self.guard_blocks = 0

    @classmethod
    def from_config(cls, config: InstanceConfig | str | Path, *, seed: int = 0) -> Instance:
        """A standalone instance from its config (a page, a script): own model, journal, keys.

        ``seed`` is the federation's seed (its slots' frozen A matrices), as in the run config.
        """
        cfg = config if isinstance(config, InstanceConfig) else InstanceConfig.load(config)
        policy = verified_instance_policy(cfg)
        base = load_base(cfg.model or policy.base_model, root=cfg.policy.parent)
        journal_path = cfg.journal or (cfg.state / "journal.sqlite" if cfg.state else None)
        if journal_path is not None:
            journal_path.parent.mkdir(parents=True, exist_ok=True)
        node = cfg.instance
        return cls(
            policy,
            instance_id=node.id,
            jurisdiction=node.jurisdiction,
            groups=node.groups,
            base=base,
            root_seed=seed,
            journal=FeedbackJournal(journal_path),
            key=load_private_key(cfg.key) if cfg.key is not None else None,
            certificates=load_certificates(cfg.certificates),
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

    def feedback(self, event: FeedbackEvent | Mapping[str, Any]) -> int:
        """Check one event and append it to the journal (durable before this returns).

        Returns the event's journal sequence number; :class:`InvalidFeedback` if bad
        (nothing is written then, and nothing recorded before is touched).
        """
        parsed = parse_event(event) if isinstance(event, Mapping) else event
        vocab = int(self.model.get_output_embeddings().weight.shape[0])  # type: ignore[operator]
        check_event(self.tokenizer, parsed, vocab)
        return self.journal.append(parsed)

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
        """Train this instance's slot of ``layer`` on the pending events; keep the result.

        The events stay pending in the journal until :meth:`update` signs the delta
        (then they form a batch, consumed when the server acknowledges it).
        """
        slot = self.slot_for(layer, key)
        events = [entry.event for entry in self.journal.pending()]
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
        envelope = self._sign(pending.delta, run_id, round, slot, pending.num_events)
        batch = self.journal.open_batch(run_id, round, str(slot), limit=pending.num_events)
        self.journal.sign_batch(batch.id, envelope.ack_id)
        return envelope, pending.delta

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

    # -- one federated round (the ClientApp's path) -------------------------------------

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
        """Train ``slot`` on one batch of pending feedback and sign the update.

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
        batch = self.journal.open_batch(run_id, round, str(slot), limit=self._one_kind(budget))
        if not batch.events:
            self.journal.release(batch.id)
            raise NoFeedback("journal", "pending feedback to train on", "none")
        supervised = all(isinstance(e, Demonstration) for e in batch.events)
        result = train_on_events(
            self.stack,
            slot,
            rules,
            self.tokenizer,
            list(batch.events),
            seed=seed,
            superego=None if supervised else self.superego,
        )
        result = dataclasses.replace(
            result, delta=privatise(result.delta, rules, slot, round, noise_seed)
        )
        leaves = policy_layer(self.policy, slot).updates_leave_instance
        arrays = result.delta if leaves else {}
        envelope = self._sign(arrays, run_id, round, slot, result.num_events)
        self.journal.sign_batch(batch.id, envelope.ack_id)
        return RoundUpdate(envelope, arrays, result, batch.id)

    def sign_arrays(
        self, arrays: Arrays, run_id: str, round: int, slot: SlotId, num_examples: int
    ) -> UpdateEnvelope:
        """Sign ``arrays`` as this instance's update of ``slot`` (secure aggregation signs its masked vector)."""
        return self._sign(arrays, run_id, round, slot, num_examples)

    def _one_kind(self, budget: int | None) -> int | None:
        """``budget`` cut so a batch never mixes demonstrations with other kinds.

        Demonstrations train supervised, the others with preference losses; a batch is
        the oldest pending events up to the first change between the two (the rest wait
        for the next round, in order).
        """
        pending = [e.event for e in self.journal.pending(limit=budget)]
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

    def _sign(
        self, arrays: Arrays, run_id: str, round: int, slot: SlotId, num_events: int
    ) -> UpdateEnvelope:
        principal, signing_key = self._signer(slot)
        return sign_update(
            arrays,
            run_id=run_id,
            round=round,
            layer=slot.layer,
            slot_key=slot.key,
            instance_id=self.instance_id,
            num_examples=num_events,
            principal_name=principal,
            private_key=signing_key,
            certificate=self._certificates.get(slot.layer),
        )

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
            self.stack.set_arrays(slot, store.load(slot))
            self.versions[str(slot)] = store.versions(slot)[-1]

    def _signer(self, slot: SlotId) -> tuple[str, Ed25519PrivateKey]:
        if self._key is None:
            raise InstanceError("key", "a private key to sign updates with", None)
        cert = self._certificates.get(slot.layer)
        if cert is not None:
            if cert.instance_id != self.instance_id:
                expected = f"a certificate for instance {self.instance_id!r}"
                raise InstanceError("certificate", expected, cert.instance_id)
            return cert.issuer, self._key
        if self._certificates:
            expected = f"a certificate for layer {slot.layer!r}"
            raise InstanceError("certificate", expected, sorted(self._certificates))
        mine = public_key_string(self._key.public_key())
        for principal in self.policy.principals:
            if principal.public_key == mine and principal.layer == slot.layer:
                return principal.name, self._key
        raise InstanceError("key", f"the key of a principal of layer {slot.layer!r}", mine[:20])
