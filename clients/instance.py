"""The Instance API: one deployed copy of the model, as a deployer embeds it.

An :class:`Instance` composes its slots (creator ... its own individual slot) on a
:class:`~layerfed.layers.LayerStack`, generates with per-token top-k
alternatives (through the output guard when the policy asks for it), records
typed feedback, trains one of its slots on that feedback with the superego's
reinforcement, signs the update for the server and applies new slot versions
the server sends back. It never opens a connection itself: the caller moves
envelopes and arrays (e.g. a Flower ClientApp).
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
from layerfed.clients.events import (
    Alternative,
    FeedbackEvent,
    FieldError,
    InvalidFeedback,
    parse_event,
)
from layerfed.clients.guard import OutputGuard
from layerfed.clients.local_train import Arrays, LocalTrainResult, check_event, train_on_events
from layerfed.clients.losses import encode
from layerfed.clients.superego import Judge, Superego
from layerfed.governance.envelope import InstanceCertificate, UpdateEnvelope, sign_update
from layerfed.governance.keys import public_key_string
from layerfed.governance.schema import Policy
from layerfed.layers.base import load_base
from layerfed.layers.slots import SlotId, policy_layer, slots_for_instance
from layerfed.layers.stack import LayerStack
from layerfed.layers.store import SlotStore
from transformers import PreTrainedTokenizerBase

__all__ = ["Generation", "Instance", "InstanceError", "TrainReport", "generate"]

log = logging.getLogger("layerfed")
TrainReport = LocalTrainResult
"""What :meth:`Instance.train` returns: the slot's clipped B delta plus metrics."""


class InstanceError(FieldError):
    """An instance was asked for something its policy, slots or keys do not allow."""


@dataclass(frozen=True)
class Generation:
    """A continuation: text, token ids, per-position top-k ``(id, logprob)``, guard verdict.

    ``guarded`` is ``True`` when the output guard changed this output (masked a token
    the model would have emitted, or replaced the text by its refusal; then
    ``alternatives`` is empty).
    """

    prompt: str
    text: str
    tokens: tuple[int, ...]
    alternatives: tuple[tuple[tuple[int, float], ...], ...]
    guarded: bool = False

    def alternative(self, position: int, chosen_token: int) -> Alternative:
        """The feedback event "at ``position`` I prefer ``chosen_token`` (a top-k candidate)"."""
        if not 0 <= position < len(self.alternatives):
            expected = f"a position < {len(self.alternatives)} with recorded alternatives"
            raise InvalidFeedback("position", expected, position)
        candidates = tuple(t for t, _ in self.alternatives[position])
        return Alternative(
            prompt=self.prompt,
            response=self.text,
            position=position,
            chosen_token=chosen_token,
            candidates=candidates,
            response_ids=self.tokens,
        )


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int = 8,
    top_k: int = 5,
    temperature: float = 0.0,
    guard: OutputGuard | None = None,
    generator: torch.Generator | None = None,
) -> Generation:
    """Decode greedily (``temperature=0``) or by sampling, through ``guard`` when given."""
    ids = encode(tokenizer, prompt)
    if not ids:
        raise InstanceError("prompt", "text that encodes to at least one token", prompt)
    tokens: list[int] = []
    alternatives: list[tuple[tuple[int, float], ...]] = []
    guarded = False
    for _ in range(max_new_tokens):
        row = torch.tensor([ids + tokens], dtype=torch.long)
        logits = model(input_ids=row, attention_mask=torch.ones_like(row)).logits[0, -1].float()
        token = _pick(logits, temperature, generator)
        if guard is not None and guard.is_banned(token):
            guarded, logits = True, guard.mask(logits)
            token = _pick(logits, temperature, generator)
        elif guard is not None:
            logits = guard.mask(logits)
        logps = torch.log_softmax(logits, dim=-1)
        top = torch.topk(logps, min(top_k, logps.shape[-1]))
        alternatives.append(tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)))
        if token == tokenizer.eos_token_id:
            alternatives.pop()
            break
        tokens.append(token)
    text = str(tokenizer.decode(tokens, skip_special_tokens=True))
    if guard is not None and guard.violates(text):
        refusal = encode(tokenizer, guard.refusal)
        return Generation(prompt, guard.refusal, tuple(refusal), (), guarded=True)
    return Generation(prompt, text, tuple(tokens), tuple(alternatives), guarded)


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy when ``temperature`` is 0, else one draw from ``softmax(logits / temperature)``."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class _Pending:
    """The summed, not yet signed delta of one slot and the events behind it."""

    delta: Arrays
    num_events: int


class Instance:
    """One deployed model instance: its slots, feedback, local training and signed updates.

    ``base`` is ``(model, tokenizer)``; when omitted the policy's ``base_model`` is
    loaded (``root`` resolves a relative path). ``store`` supplies the latest
    version of each slot (checked against this stack's A seeds). ``key`` signs
    updates: as the certified instance key when ``certificate`` is given, else as
    the policy principal whose public key it is.
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
        key: Ed25519PrivateKey | None = None,
        certificate: InstanceCertificate | None = None,
        seed: int = 0,
        root_seed: int = 0,
        judge: Judge | None = None,
        guard: OutputGuard | None = None,
        root: Path | None = None,
    ) -> None:
        self.policy = policy
        self.instance_id = instance_id
        self.seed = seed
        model, self.tokenizer = (
            base if base is not None else load_base(policy.base_model, root=root)
        )
        digest = store.redline_digest() if store is not None else None
        self.stack = LayerStack(
            policy, model, self.tokenizer, root_seed, expected_redline_digest=digest
        )
        self.slots = slots_for_instance(policy, instance_id, jurisdiction, groups)
        self.stack.activate(self.slots)
        self.versions: dict[str, int] = {str(s): 0 for s in self.slots}
        if store is not None:
            self._load(store)
        self.superego = Superego.from_policy(
            policy, self.stack, self.tokenizer, judge=judge, seed=seed
        )
        self.guard = guard or (
            OutputGuard(self.tokenizer) if policy.red_lines.output_guard else None
        )
        self._key, self._certificate = key, certificate
        self._events: list[FeedbackEvent] = []
        self._pending: dict[SlotId, _Pending] = {}
        self._last: SlotId | None = None
        self._train_calls = 0
        self._generations = 0
        self.guard_blocks = 0

    # -- model ------------------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        """The composed model (base + every slot of this instance)."""
        return self.stack.model

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
        """The recorded feedback, oldest first."""
        return tuple(self._events)

    def feedback(self, event: FeedbackEvent | Mapping[str, Any]) -> None:
        """Record one event (a model or untrusted mapping); :class:`InvalidFeedback` if bad."""
        parsed = parse_event(event) if isinstance(event, Mapping) else event
        vocab = int(self.model.get_output_embeddings().weight.shape[0])  # type: ignore[operator]
        check_event(self.tokenizer, parsed, vocab)
        self._events.append(parsed)

    def clear_feedback(self) -> None:
        """Forget every recorded event."""
        self._events.clear()

    # -- training and updates ---------------------------------------------------------

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
    ) -> TrainReport:
        """Train this instance's slot of ``layer`` on the recorded events; keep the result.

        The clipped delta also joins the slot's pending update for :meth:`update`.
        """
        slot = self.slot_for(layer, key)
        layer_policy = policy_layer(self.policy, slot)
        report = train_on_events(
            self.stack,
            slot,
            layer_policy,
            self.tokenizer,
            self._events,
            seed=self.seed * 7919 + self._train_calls,
            steps=steps,
            superego=self.superego,
            keep=True,
        )
        self._train_calls += 1
        self._add_pending(slot, report)
        self._last = slot
        return report

    def update(
        self, run_id: str, round: int, layer: str | None = None, *, key: str | None = None
    ) -> tuple[UpdateEnvelope, Arrays]:
        """Sign the slot's delta since the last update (default: the last trained slot).

        Returns the envelope and the arrays it covers, then starts a new pending delta.
        Whether the arrays may leave the instance is the layer's ``updates_leave_instance``.
        """
        slot = self._last if layer is None and self._last is not None else self.slot_for(layer, key)
        pending = self._pending.pop(slot, None)
        if pending is None:
            raise InstanceError("update", f"a trained slot {slot} since the last update", None)
        principal, signing_key = self._signer(slot)
        envelope = sign_update(
            pending.delta,
            run_id=run_id,
            round=round,
            layer=slot.layer,
            slot_key=slot.key,
            instance_id=self.instance_id,
            num_examples=pending.num_events,
            principal_name=principal,
            private_key=signing_key,
            certificate=self._certificate,
        )
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

    def decay(self, rounds: float = 1.0) -> None:
        """Let the memories of this instance's own (per-instance) slots fade by ``rounds``."""
        for slot in self.slots:
            if policy_layer(self.policy, slot).slot_key == "instance":
                self.stack.decay(slot, rounds=rounds)

    def metrics(self) -> dict[str, float]:
        """Counters since construction: events, superego and guard interventions."""
        ego = self.superego
        return {
            "events": float(len(self._events)),
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
            self.stack.set_arrays(slot, store.load(slot))
            self.versions[str(slot)] = store.versions(slot)[-1]

    def _add_pending(self, slot: SlotId, report: TrainReport) -> None:
        old = self._pending.get(slot)
        if old is None:
            self._pending[slot] = _Pending(dict(report.delta), report.num_events)
            return
        summed = {k: old.delta[k] + report.delta[k] for k in report.delta}
        self._pending[slot] = _Pending(summed, max(old.num_events, report.num_events))

    def _signer(self, slot: SlotId) -> tuple[str, Ed25519PrivateKey]:
        if self._key is None:
            raise InstanceError("key", "a private key to sign updates with", None)
        if self._certificate is not None:
            cert = self._certificate
            if cert.layer != slot.layer or cert.instance_id != self.instance_id:
                expected = f"a certificate for layer {slot.layer!r}, instance {self.instance_id!r}"
                raise InstanceError("certificate", expected, (cert.layer, cert.instance_id))
            return cert.issuer, self._key
        mine = public_key_string(self._key.public_key())
        for principal in self.policy.principals:
            if principal.public_key == mine and principal.layer == slot.layer:
                return principal.name, self._key
        raise InstanceError("key", f"the key of a principal of layer {slot.layer!r}", mine[:20])
