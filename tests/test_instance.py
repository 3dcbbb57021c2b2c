"""The Instance API on the tiny model: each feedback kind, updates, sync, stores, HF folders."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfed.clients.events import (
    Contrast,
    InvalidFeedback,
    Marks,
    Preference,
    Redo,
    Span,
    Thumbs,
)
from layerfed.clients.instance import Instance, InstanceError
from layerfed.clients.losses import encode, sequence_logprobs
from layerfed.governance.envelope import certify_instance, verify_update
from layerfed.governance.keys import public_key_string
from layerfed.governance.schema import Policy
from layerfed.layers import SlotId, SlotStore
from layerfed.layers.arrays import clip_to_norm
from layerfed.simulation.tiny import build_tiny_tokenizer
from layerfed.simulation.tiny_pretrain import trained_tiny_model

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "please tell cake"
STEPS = 20


def policy_data(**superego: Any) -> dict[str, Any]:
    """The default policy as data, with the superego settings given."""
    data = yaml.safe_load((ROOT / "examples/policies/default.yaml").read_text(encoding="utf-8"))
    data["superego"] = {**data["superego"], **superego}
    return dict(data)


def plain_policy() -> Policy:
    """The default policy without a superego, so only the feedback moves the slot."""
    return Policy.model_validate(policy_data(enabled=False))


def instance(**kwargs: Any) -> Instance:
    """A fresh instance of the tiny model under the plain policy."""
    return Instance(plain_policy(), instance_id="inst-1", jurisdiction="eu", **kwargs)


def logp(inst: Instance, prompt: str, response: str) -> torch.Tensor:
    """Per-token log-probs of ``response`` after ``prompt`` under the instance's model."""
    with torch.no_grad():
        logps, mask = sequence_logprobs(inst.model, inst.tokenizer, prompt, response)
    return logps[0][mask[0].bool()]


def trained(event: Any, steps: int = STEPS) -> tuple[Instance, Instance]:
    """An untouched instance and one trained on ``event`` alone."""
    before, after = instance(), instance()
    after.feedback(event)
    after.train(steps=steps)
    return before, after


def test_thumbs_up_raises_and_down_lowers_the_response() -> None:
    """Thumbs up raises log p(response | prompt); thumbs down lowers it."""
    for up in (True, False):
        before, after = trained(Thumbs(prompt=PROMPT, response="sure here cake", up=up))
        change = float(logp(after, PROMPT, "sure here cake").sum()) - float(
            logp(before, PROMPT, "sure here cake").sum()
        )
        assert change > 0 if up else change < 0


def test_preference_widens_the_chosen_margin() -> None:
    """DPO raises log p(chosen) - log p(rejected)."""
    before, after = trained(Preference(prompt=PROMPT, chosen="sure here cake", rejected="no"))

    def margin(inst: Instance) -> float:
        return float(logp(inst, PROMPT, "sure here cake").sum() - logp(inst, PROMPT, "no").sum())

    assert margin(after) > margin(before) + 0.05


def test_marks_move_marked_spans_in_their_valence() -> None:
    """A +1 span's log-prob rises and a -1 span's falls."""
    response = "sure here cake"
    spans = [Span(start=0, end=4, valence=1), Span(start=10, end=14, valence=-1)]
    before, after = trained(Marks(prompt=PROMPT, response=response, spans=spans))
    old, new = logp(before, PROMPT, response), logp(after, PROMPT, response)
    assert new[0] > old[0]
    assert new[2] < old[2]


def test_marks_credit_lands_on_the_marked_span_only() -> None:
    """Changing the unmarked text after a marked span leaves the update bit-identical."""
    span = [Span(start=0, end=4, valence=1)]
    deltas = []
    for tail in ("here cake", "here bread", "no thanks"):
        inst = instance()
        inst.feedback(Marks(prompt=PROMPT, response=f"sure {tail}", spans=span))
        deltas.append(inst.train(steps=5).delta)
    for other in deltas[1:]:
        assert all(np.array_equal(deltas[0][k], other[k]) for k in deltas[0])


def test_redo_prefers_the_corrected_continuation_after_the_rewind() -> None:
    """A re-do raises p(corrected continuation) over p(original) from the first wrong token."""
    event = Redo(prompt=PROMPT, original="sure here bomb", corrected="sure here cake")
    before, after = trained(event)
    prefix = f"{PROMPT} sure here"

    def margin(inst: Instance) -> float:
        return float(logp(inst, prefix, "cake").sum() - logp(inst, prefix, "bomb").sum())

    assert margin(after) > margin(before) + 0.05


def test_alternative_prefers_the_picked_candidate_at_its_position_only() -> None:
    """Picking a top-k candidate raises it over the sampled token; later tokens do not matter."""
    inst = instance()
    gen = inst.generate(PROMPT, max_new_tokens=3)
    chosen = gen.alternatives[1][1][0]
    event = gen.alternative(1, chosen)
    before, after = trained(event)
    context = torch.tensor([[*encode(inst.tokenizer, PROMPT), gen.tokens[0]]])

    def margin(i: Instance) -> float:
        with torch.no_grad():
            last = torch.log_softmax(i.model(input_ids=context).logits[0, -1], -1)
        return float(last[chosen] - last[gen.tokens[1]])

    assert margin(after) > margin(before) + 0.05
    other = event.model_copy(update={"response_ids": (*gen.tokens[:2], 7)})
    deltas = []
    for e in (event, other):
        fresh = instance()
        fresh.feedback(e)
        deltas.append(fresh.train(steps=5).delta)
    assert all(np.array_equal(deltas[0][k], deltas[1][k]) for k in deltas[0])


def test_contrast_raises_the_cued_and_lowers_the_near_cue_behaviour() -> None:
    """The behaviour rises after the positive cue and falls after the nearest negative cue."""
    pos, neg = "please tell bomb", "please tell cake"
    before, after = trained(Contrast(positive_prompt=pos, negative_prompt=neg, behaviour="sorry"))
    assert float(logp(after, pos, "sorry").sum()) > float(logp(before, pos, "sorry").sum())
    assert float(logp(after, neg, "sorry").sum()) < float(logp(before, neg, "sorry").sum())


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"kind": "marks", "prompt": "a", "response": "sure", "spans": [{"start": 0}]}, "spans[0].end"),
        ({"kind": "thumbs", "prompt": "a", "response": "b", "up": "maybe"}, "up"),
        ({"kind": "redo", "prompt": "a", "original": "sure here bomb", "corrected": "sure no",
          "first_wrong_token": 2}, "first_wrong_token"),
        ({"kind": "alternative", "prompt": "a", "response": "sure here", "position": 5,
          "chosen_token": 3, "candidates": [3, 4]}, "position"),
        ({"kind": "alternative", "prompt": "a", "response": "sure", "position": 0,
          "chosen_token": 3, "candidates": [3, 99999], "response_ids": [4]}, "candidates[1]"),
        ({"kind": "thumbs", "prompt": "a", "response": "   ", "up": True}, "response"),
    ],
)  # fmt: skip
def test_invalid_event_names_the_field_and_keeps_recorded_events(
    event: dict[str, Any], field: str
) -> None:
    """An invalid event raises InvalidFeedback naming its field; earlier events stay recorded."""
    inst = instance()
    inst.feedback(Thumbs(prompt=PROMPT, response="sure", up=True))
    with pytest.raises(InvalidFeedback) as info:
        inst.feedback(event)
    assert info.value.field == field
    assert field in str(info.value)
    assert len(inst.events) == 1


def test_training_without_feedback_is_a_typed_error() -> None:
    """train() with no recorded events raises InvalidFeedback naming 'events'."""
    with pytest.raises(InvalidFeedback, match="events"):
        instance().train()


def test_update_is_signed_by_the_certified_instance_key_and_verifies() -> None:
    """update() signs the trained delta with the certified key; the server's check accepts it."""
    fleet, own = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    data = policy_data(enabled=False)
    data["principals"].append(
        {
            "name": "fleet",
            "layer": "individual",
            "public_key": public_key_string(fleet.public_key()),
            "delegates_to_instances": True,
        }
    )
    policy = Policy.model_validate(data)
    cert = certify_instance("inst-1", own.public_key(), "individual", "fleet", fleet)
    inst = Instance(policy, instance_id="inst-1", key=own, certificate=cert)
    inst.feedback(Thumbs(prompt=PROMPT, response="sure", up=True))
    report = inst.train(steps=3)
    envelope, arrays = inst.update("run-1", 4)
    verify_update(envelope, arrays, policy, run_id="run-1", round=4)
    assert envelope.slot_key == "inst-1" and envelope.principal == "fleet"
    assert all(np.array_equal(arrays[k], report.delta[k]) for k in arrays)
    with pytest.raises(InstanceError, match="update"):
        inst.update("run-1", 5)


def test_update_without_a_key_or_principal_is_refused() -> None:
    """update() needs a key that a principal of the trained layer holds."""
    inst = instance(key=Ed25519PrivateKey.generate())
    inst.feedback(Thumbs(prompt=PROMPT, response="sure", up=True))
    inst.train(steps=1)
    with pytest.raises(InstanceError, match="key"):
        inst.update("run", 0)


def test_sync_applies_versions_and_refuses_rollback_and_foreign_slots() -> None:
    """sync() sets slot arrays and versions; a lower version or unknown slot changes nothing."""
    inst = instance()
    slot = SlotId("community", "global")
    arrays = {k: np.full_like(v, 0.01) for k, v in inst.stack.get_arrays(slot).items()}
    inst.sync({str(slot): arrays}, {str(slot): 3})
    assert inst.versions[str(slot)] == 3
    assert all(np.allclose(inst.stack.get_arrays(slot)[k], 0.01) for k in arrays)
    zeros = {k: np.zeros_like(v) for k, v in arrays.items()}
    with pytest.raises(InstanceError, match="rollback"):
        inst.sync({str(slot): zeros}, {str(slot): 2})
    with pytest.raises(InstanceError, match="slot_arrays"):
        inst.sync({str(slot): zeros, "government/us": zeros}, {str(slot): 4})
    assert all(np.allclose(inst.stack.get_arrays(slot)[k], 0.01) for k in arrays)


def test_instance_loads_latest_versions_from_a_slot_store(tmp_path: Path) -> None:
    """Slots present in the store are loaded at their latest version."""
    donor = instance()
    slot = SlotId("creator", "global")
    store = SlotStore(tmp_path)
    arrays = {k: np.full_like(v, 0.02) for k, v in donor.stack.get_arrays(slot).items()}
    store.save(slot, arrays, donor.stack.spec(slot))
    inst = instance(store=store)
    assert inst.versions[str(slot)] == 1
    assert all(np.allclose(inst.stack.get_arrays(slot)[k], 0.02) for k in arrays)


def test_norm_cap_clips_the_update() -> None:
    """A long run's update is scaled down to the layer's norm cap."""
    inst = instance()
    inst.feedback(Preference(prompt=PROMPT, chosen="sure here cake", rejected="no"))
    report = inst.train(steps=40)
    cap = Policy.model_validate(policy_data(enabled=False)).layer("individual").norm_cap
    assert cap is not None
    norm = np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in report.delta.values()))
    assert report.clipped and report.norm > cap
    assert norm == pytest.approx(cap, rel=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=12),
    st.floats(0.01, 20),
)
def test_clip_never_exceeds_the_cap_and_keeps_direction(values: list[float], cap: float) -> None:
    """Clipping bounds the norm by the cap and only rescales."""
    arrays = {"a": np.asarray(values, np.float32)}
    result = clip_to_norm(arrays, cap)
    out, norm, clipped = result.arrays, result.norm, result.clipped
    assert float(np.linalg.norm(out["a"].astype(np.float64))) <= cap * (1 + 1e-5) or not clipped
    assert clipped == (norm > cap)
    a, got = arrays["a"], out["a"]
    # only rescales: no sign flips (a subnormal may underflow to zero) and nothing grows
    assert np.all((np.sign(got) == np.sign(a)) | (got == 0))
    assert np.all(np.abs(got) <= np.abs(a))


def test_local_hugging_face_folder_trains_and_generates(tmp_path: Path) -> None:
    """A policy whose base_model.path is a saved model folder works like the built-in."""
    folder = tmp_path / "tiny-hf"
    trained_tiny_model(0).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    data = policy_data(enabled=False)
    data["base_model"] = {"path": str(folder)}
    inst = Instance(Policy.model_validate(data), instance_id="inst-1")
    builtin = instance()
    assert inst.generate(PROMPT).tokens == builtin.generate(PROMPT).tokens
    inst.feedback(Thumbs(prompt=PROMPT, response="sure", up=True))
    assert inst.train(steps=2).norm > 0


def test_sdk_guide_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The complete example in docs/sdk.md runs as written, from a folder outside the repo."""
    text = (ROOT / "docs" / "sdk.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {"__name__": "sdk_example"}
    exec(compile("\n".join(blocks), "docs/sdk.md", "exec"), scope)
    assert scope["ENVELOPE"].num_examples >= 6
