"""`layerfed policy test POLICY TESTFILE...`: decide each case with the federation's own code.

The runner holds no rule of its own. An update case goes through the stages a
real reply goes through, each the project's function:

1. intake: :func:`~layerfed.governance.envelope.verify_update` on an envelope
   signed for the case (the policy's principals get test keys of the runner's
   own, so signatures, certificates and slot authority are checked for real);
2. validation: the :class:`~layerfed.federation.validate.ReplyChecks` that
   :func:`~layerfed.federation.stages.aggregate.slot_checks` builds for the slot
   (red line, scope, norm cap and clip);
3. the server step (:func:`~layerfed.layers.arrays.server_step`, ``server_lr``);
4. the vetoes: :func:`~layerfed.federation.vetoes.check_slot` with the case's
   approvals and probe rates.

A composition case asks :func:`~layerfed.layers.slots.slots_for_instance`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from layerfed.federation.stages.aggregate import slot_checks
from layerfed.federation.validate import ReplyChecks, array_scope
from layerfed.federation.vetoes import check_slot
from layerfed.governance.envelope import (
    UpdateRejected,
    certify_instance,
    sign_update,
    verify_update,
)
from layerfed.governance.keys import public_key_string
from layerfed.governance.policy_test_cases import Case, LoadedCase, UpdateCase
from layerfed.governance.policy_test_report import CaseResult, Outcome
from layerfed.governance.schema import Policy
from layerfed.layers.arrays import server_step
from layerfed.layers.slots import GLOBAL_KEY, ArrayName, SlotId, slots_for_instance

__all__ = ["decide", "decide_update", "run_cases", "run_files"]

RUN_ID = "policy-test"
_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class _Spec:
    shapes_: dict[str, tuple[int, ...]]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.shapes_


@dataclass(frozen=True)
class _Stack:
    shapes: dict[str, tuple[int, ...]]

    def spec(self, slot: SlotId) -> _Spec:
        return _Spec(self.shapes)


@dataclass(frozen=True)
class _Round:
    """What :func:`slot_checks` reads of a round: the policy and the slot's array shapes."""

    policy: Policy
    stack: _Stack


def _keyed(policy: Policy) -> tuple[Policy, dict[str, Ed25519PrivateKey]]:
    """``policy`` with a fresh key per principal (same names, layers, slots, delegation)."""
    keys = {p.name: Ed25519PrivateKey.generate() for p in policy.principals}
    principals = [
        p.model_copy(update={"public_key": public_key_string(keys[p.name].public_key())})
        for p in policy.principals
    ]
    return policy.model_copy(update={"principals": principals}), keys


def _slot_key(policy: Policy, case: UpdateCase) -> str:
    if case.slot is not None:
        return case.slot
    kind = policy.layer(case.layer).slot_key
    return GLOBAL_KEY if kind == "global" else case.instance


def _arrays(policy: Policy, case: UpdateCase, slot: SlotId) -> dict[str, np.ndarray[Any, Any]]:
    """One (1, 1) float32 B array per parameter, the whole norm on the first."""
    layer = policy.layer(case.layer)
    memory = case.memory or layer.memories[0].name
    out: dict[str, np.ndarray[Any, Any]] = {}
    for i, parameter in enumerate(case.parameters):
        module = parameter.removesuffix(".weight")
        value = case.norm if i == 0 else 0.0
        out[str(ArrayName(slot, memory, module))] = np.full((1, 1), value, dtype=np.float32)
    return out


def _intake(policy: Policy, case: UpdateCase, slot: SlotId, arrays: dict[str, Any]) -> str:
    """Sign the case's envelope and verify it as the server does; returns the trace line."""
    keyed, keys = _keyed(policy)
    key = keys.get(case.signer, Ed25519PrivateKey.generate())
    certificate = None
    signing = key
    if case.via_instance:
        signing = Ed25519PrivateKey.generate()
        certificate = certify_instance(
            case.instance, signing.public_key(), case.layer, case.signer, key
        )
    envelope = sign_update(
        arrays,
        run_id=RUN_ID,
        round=1,
        layer=case.layer,
        slot_key=slot.key,
        instance_id=case.instance,
        num_examples=1,
        principal_name=case.signer,
        private_key=signing,
        certificate=certificate,
    )
    verify_update(envelope, arrays, keyed, run_id=RUN_ID, round=1)
    how = "an instance key certified by" if case.via_instance else "the key of"
    return f"intake: signature by {how} {case.signer!r} verified for slot {slot}"


def _probe(case: UpdateCase) -> Any:
    def probe(suite: str, candidate: object) -> float:
        before, after = case.probes.get(suite, (0.0, 0.0))
        return float(before if candidate is None else after)

    return probe


def decide_update(policy: Policy, case: UpdateCase) -> Outcome:
    """Intake, validation, server step and vetoes of one proposed update."""
    try:
        layer = policy.layer(case.layer)
    except KeyError:
        known = [la.name for la in policy.layers]
        return Outcome("refused", "unknown_layer", trace=(f"layer: expected one of {known}",))
    slot = SlotId(layer.name, _slot_key(policy, case))
    arrays = _arrays(policy, case, slot)
    trace: list[str] = []
    try:
        trace.append(_intake(policy, case, slot, arrays))
    except UpdateRejected as e:
        trace.append(f"intake: refused: {e.reason}: {e.detail}")
        return Outcome("refused", e.reason, trace=tuple(trace))
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    checks: ReplyChecks = slot_checks(cast(Any, _Round(policy, _Stack(shapes))), slot, _MAX_BYTES)
    validation = checks.validate(arrays)
    if not validation.ok:
        trace.append(f"validation: refused: {validation.reason}: {validation.detail}")
        return Outcome("refused", str(validation.reason), trace=tuple(trace))
    cap = "none" if layer.norm_cap is None else f"{layer.norm_cap:g}"
    trace.append(f"validation: ok, norm {validation.norm:g} (norm_cap {cap}) {validation.detail}")
    step = server_step(validation.arrays, layer.server_lr)
    trace.append(f"step: server_lr {layer.server_lr:g}")
    scoped, _ = array_scope(layer, policy)
    decision = check_slot(
        policy,
        layer.name,
        step,
        in_scope=lambda _layer, name: scoped(name),
        probe=_probe(case),
        approvals=set(case.approvals),
    )
    applying = [v.name for v in policy.vetoes if layer.name in v.applies_to]
    trace.append(f"vetoes applying to {layer.name!r}: {applying or 'none'}")
    trace.extend(
        f"veto {h.veto_name} ({h.holder}): {h.reason} -> {h.action}" for h in decision.hits
    )
    return _verdict(decision.action, decision.hits, validation.clipped, trace)


def _verdict(action: str, hits: tuple[Any, ...], clipped: bool, trace: list[str]) -> Outcome:
    by_action = {h.action: h.veto_name for h in reversed(hits)}
    if action == "reject":
        outcome = Outcome("vetoed", by_action["reject"])
    elif action == "hold":
        outcome = Outcome("held", by_action["hold"])
    elif action == "clip" or clipped:
        outcome = Outcome("committed", "clipped")
    else:
        outcome = Outcome("committed", "ok")
    trace.append(f"decision: {outcome.summary()}")
    return Outcome(outcome.decision, outcome.reason, trace=tuple(trace))


def decide(policy: Policy, case: Case) -> Outcome:
    """The outcome of one case under ``policy``."""
    if case.update is not None:
        return decide_update(policy, case.update)
    assert case.composition is not None
    c = case.composition
    slots = tuple(str(s) for s in slots_for_instance(policy, c.instance, c.jurisdiction, c.groups))
    trace = (f"composition of {c.instance!r} ({c.jurisdiction}, {c.groups}): {list(slots)}",)
    return Outcome("composed", slots=slots, trace=trace)


def _expected(case: Case) -> str:
    e = case.expect
    if e.slots is not None:
        return "slots " + ", ".join(e.slots)
    return f"{e.decision} ({e.reason})" if e.reason else str(e.decision)


def _passes(case: Case, got: Outcome) -> bool:
    e = case.expect
    if e.slots is not None:
        return got.slots == tuple(e.slots)
    return got.decision == e.decision and (e.reason is None or got.reason == e.reason)


def run_cases(policy: Policy, cases: list[LoadedCase]) -> list[CaseResult]:
    """Every case decided and compared with what it expects."""
    results = []
    for loaded in cases:
        got = decide(policy, loaded.case)
        ok = _passes(loaded.case, got)
        results.append(
            CaseResult(loaded.file, loaded.line, loaded.case.name, _expected(loaded.case), got, ok)
        )
    return results


def run_files(policy_file: Path, files: list[Path]) -> list[CaseResult]:
    """Load ``policy_file`` and every test file, then run all cases."""
    from layerfed.governance.loader import load_policy
    from layerfed.governance.policy_test_cases import load_case_file

    policy = load_policy(policy_file)
    cases = [c for f in files for c in load_case_file(f)]
    return run_cases(policy, cases)
