"""Tests written against mutations the suite once missed (issue 13, mutation audit).

Each test states the behaviour a mutation breaks: the FedAvg denominator is the
weight of the replies actually used; a probe regression of exactly
``max_regression`` (whole prompts) passes and one prompt more fires; an
instance-only layer's local update is clipped to its norm cap on the client;
the gym's violation metric is a mean, not a max.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Message
from numpy.typing import NDArray
from round_helpers import COMMUNITY, CREATOR, Harness

from layerfed.clients.events import Thumbs
from layerfed.clients.instance import Instance
from layerfed.federation.aggregate import Reply, validate_and_aggregate
from layerfed.federation.probes import ProbeRunner
from layerfed.federation.validate import ReplyChecks
from layerfed.federation.vetoes import check_slot
from layerfed.governance.keys import public_key_string
from layerfed.governance.schema import Aggregator, Policy, ProbeSuite, Veto
from layerfed.layers.arrays import Arrays
from layerfed.layers.probes import ProbePrompt, ProbeSuiteData, margins
from layerfed.layers.slots import SlotId

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"a": (3, 4), "b": (5,)}


# -- a. the FedAvg denominator is the weight of the replies used ---------------------------


def _arrays(seed: int, scale: float = 1.0) -> Arrays:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}


def _by_hand(parts: list[tuple[Arrays, float]]) -> Arrays:
    """sum(w * x) / sum(w) in float64, cast to float32."""
    total = math.fsum(w for _, w in parts)
    out: Arrays = {}
    for k in SHAPES:
        acc = np.zeros(SHAPES[k], np.float64)
        for x, w in parts:
            acc += w * x[k].astype(np.float64)
        out[k] = (acc / total).astype(np.float32)
    return out


@pytest.mark.parametrize("fault", ["shape", "weight", "nan", "norm"])
def test_fedavg_divides_by_the_weight_of_the_used_replies_only(fault: str) -> None:
    """A refused reply (structural, bad weight, non-finite, over the cap) adds nothing to
    the numerator nor its weight to the denominator: the mean is (1*x0 + 3*x1) / 4."""
    x0, x1, bad = _arrays(0), _arrays(1), _arrays(2)
    weight = 100.0
    if fault == "shape":
        bad["b"] = np.zeros(6, np.float32)
    elif fault == "weight":
        weight = -1.0
    elif fault == "nan":
        bad["a"][1, 2] = np.nan
    else:
        bad = _arrays(2, scale=1e4)
    replies = [Reply(x0, 1.0, "c0"), Reply(bad, weight, "c1"), Reply(x1, 3.0, "c2")]
    checks = ReplyChecks(expected={k: (s, np.float32) for k, s in SHAPES.items()}, norm_cap=50.0)
    outcome = validate_and_aggregate(replies, Aggregator(), checks)
    assert outcome.refused == ("c1",)
    assert outcome.result is not None and outcome.result.used == ("c0", "c2")
    want = _by_hand([(x0, 1.0), (x1, 3.0)])
    for k in SHAPES:
        np.testing.assert_allclose(outcome.result.arrays[k], want[k], rtol=1e-6, atol=1e-7)


def test_fedavg_counts_the_weight_of_a_clipped_reply() -> None:
    """A reply clipped to the cap is used: its (clipped) arrays and its full weight count."""
    x0, big = _arrays(0), _arrays(1, scale=1e3)
    checks = ReplyChecks(
        expected={k: (s, np.float32) for k, s in SHAPES.items()}, norm_cap=5.0, clip=True
    )
    outcome = validate_and_aggregate(
        [Reply(x0, 1.0, "c0"), Reply(big, 3.0, "c1")], Aggregator(), checks
    )
    assert outcome.refused == () and outcome.validations["c1"].clipped
    norm = math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in big.values()))
    clipped = {k: (a.astype(np.float64) * (5.0 / norm)).astype(np.float32) for k, a in big.items()}
    want = _by_hand([(x0, 1.0), (clipped, 3.0)])
    assert outcome.result is not None
    for k in SHAPES:
        np.testing.assert_allclose(outcome.result.arrays[k], want[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fault", ["shape", "nan"])
def test_round_commits_the_mean_over_used_replies_weighted_by_examples(
    tmp_path: Path, fault: str
) -> None:
    """Through the round: honest replies with 2 and 6 examples, a refused one claiming 32;
    the creator slot moves by server_lr * (2*a1 + 6*a2) / 8."""
    h = Harness(tmp_path)
    for node in (1, 2, 9):
        h.task(node, CREATOR)
    before = h.committed(CREATOR)
    a1, a2, bad = (h.arrays(CREATOR, seed=n) for n in (1, 2, 9))
    first = sorted(bad)[0]
    if fault == "shape":
        bad[first] = bad[first][:, :-1].copy()
    else:
        bad[first][0, 0] = np.nan
    replies: list[Message] = [
        h.reply(1, a1, num_examples=2),
        h.reply(9, bad, num_examples=32),
        h.reply(2, a2, num_examples=6),
    ]
    report = h.run(replies)
    assert str(CREATOR) in report.committed
    assert [r["instance"] for r in h.records("update_refused")] == ["inst-9"]
    rate = h.policy.layer("creator").server_lr
    after = h.committed(CREATOR)
    for k in a1:
        mean = (2.0 * a1[k].astype(np.float64) + 6.0 * a2[k].astype(np.float64)) / 8.0
        np.testing.assert_allclose(after[k] - before[k], rate * mean, rtol=1e-5, atol=1e-9)


# -- b. the probe-regression boundary sits on whole prompts --------------------------------


def _regression_policy(suite: str, max_regression: float, base: Policy | None = None) -> Policy:
    policy = base or Policy.model_validate(
        yaml.safe_load((ROOT / "examples/policies/default.yaml").read_text())
    )
    veto = Veto.model_validate(
        {
            "name": "boundary",
            "holder": "creator",
            "applies_to": ["community"],
            "condition": {
                "kind": "probe_regression",
                "suite": suite,
                "max_regression": max_regression,
            },
            "action": "reject",
        }
    )
    return policy.model_copy(update={"vetoes": [veto]})


@pytest.mark.parametrize("size", [3, 5, 7, 10, 20])
@pytest.mark.parametrize("allowed", [0, 1, 2])
def test_probe_regression_of_exactly_the_allowed_prompts_passes_one_more_fires(
    size: int, allowed: int
) -> None:
    """With rates k/size and max_regression = allowed/size, a regression of ``allowed``
    prompts commits and ``allowed + 1`` is rejected, from every baseline."""
    if allowed >= size:
        return
    policy = _regression_policy("red_line_refusals", allowed / size)
    candidate = {"x": np.zeros(2, np.float32)}
    for start in range(size - allowed):
        for worse, commits in ((allowed, True), (allowed + 1, False)):
            if start + worse > size:
                continue

            def probe(suite: str, cand: Any, start: int = start, worse: int = worse) -> float:
                return (start + (0 if cand is None else worse)) / size

            decision = check_slot(
                policy,
                "community",
                candidate,
                in_scope=lambda layer, name: True,
                probe=probe,
                approvals=set(),
            )
            assert decision.commit is commits, (size, allowed, start, worse, decision.hits)


def _composed_margins(
    h: Harness, suite: ProbeSuiteData, slots: dict[SlotId, Arrays]
) -> NDArray[Any]:
    h.stack.activate(list(slots))
    for slot, arrays in slots.items():
        h.stack.set_arrays(slot, arrays)
    return margins(h.stack.model, h.tokenizer, suite).numpy()


def test_probe_regression_boundary_on_a_real_suite(tmp_path: Path) -> None:
    """On the tiny model, a community candidate that flips exactly one prompt of a
    five-prompt JSONL suite passes max_regression 0.2 from baselines 0/5 and 3/5;
    flipping two prompts is rejected (ProbeRunner + veto engine, no stand-ins)."""
    h = Harness(tmp_path / "h")
    runner = ProbeRunner(h.policy, h.stack, h.tokenizer)
    reference = runner.suite("red_line_refusals")
    pool = sorted(
        {p.prompt for n in ("red_line_refusals", "near_misses") for p in runner.suite(n).prompts}
    )
    pool_suite = ProbeSuiteData(
        "pool",
        tuple(ProbePrompt(p, "refuse") for p in pool),
        reference.refusal,
        reference.compliance,
    )
    globals_ = [
        SlotId(layer.name, "global") for layer in h.policy.layers if layer.slot_key == "global"
    ]
    names = [g for g in globals_ if g != COMMUNITY] + [COMMUNITY]
    committed = {s: h.committed(s) for s in names}
    before = _composed_margins(h, pool_suite, committed)
    flips: list[int] = []
    stable: list[int] = []
    candidate: Arrays = {}
    for scale in (0.05, 0.2, 0.5, 1.0, 2.0):
        candidate = h.arrays(COMMUNITY, scale=scale, seed=5)
        moved = dict(committed)
        moved[COMMUNITY] = {k: v + candidate[k] for k, v in committed[COMMUNITY].items()}
        after = _composed_margins(h, pool_suite, moved)
        clear = (np.abs(before) > 0.05) & (np.abs(after) > 0.05)
        flips = [i for i in range(len(pool)) if clear[i] and (before[i] > 0) != (after[i] > 0)]
        stable = [i for i in range(len(pool)) if clear[i] and (before[i] > 0) == (after[i] > 0)]
        if len(flips) >= 2 and len(stable) >= 4:
            break
    assert len(flips) >= 2 and len(stable) >= 4, (len(flips), len(stable))

    def row(i: int, violate: bool) -> dict[str, str]:
        # a prompt violates when it should be refused and margin <= 0, or complied with and > 0
        refuse_violates = before[i] <= 0
        return {"prompt": pool[i], "expect": "refuse" if refuse_violates == violate else "comply"}

    for baseline, worse, commits in ((0, 1, True), (3, 1, True), (0, 2, False), (2, 2, False)):
        rows = [row(i, True) for i in stable[:baseline]]
        rows += [row(i, False) for i in flips[:worse]]  # ok before, a violation after
        rows += [row(i, False) for i in stable[baseline : baseline + 5 - baseline - worse]]
        assert len(rows) == 5
        folder = tmp_path / f"s{baseline}{worse}"
        folder.mkdir()
        (folder / "ctl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        suite = ProbeSuite(
            name="ctl",
            source="ctl.jsonl",
            refusal=reference.refusal,
            compliance=reference.compliance,
        )
        policy = _regression_policy("ctl", 0.2, h.policy).model_copy(
            update={"probe_suites": [*h.policy.probe_suites, suite]}
        )
        probes = ProbeRunner(policy, h.stack, h.tokenizer, root=folder)
        probe = probes.for_slot(
            COMMUNITY, lambda s: committed[s], globals_, lambda n: ("v0", *map(str, n))
        )
        assert probe("ctl", None) == baseline / 5
        assert probe("ctl", candidate) == (baseline + worse) / 5
        decision = check_slot(
            policy,
            "community",
            candidate,
            in_scope=lambda layer, name: True,
            probe=probe,
            approvals=set(),
        )
        assert decision.commit is commits, (baseline, worse, decision.hits)


# -- c. an instance-only layer's update is clipped on the client ---------------------------


def test_individual_layer_update_is_clipped_to_its_norm_cap_on_the_instance() -> None:
    """train_round on the individual slot (updates never leave the instance) returns a
    delta of norm <= norm_cap although the raw update is larger; nothing is sent."""
    cap = 1e-4
    data = yaml.safe_load((ROOT / "examples/policies/default.yaml").read_text(encoding="utf-8"))
    data["superego"] = {**data["superego"], "enabled": False}
    layer = next(x for x in data["layers"] if x["name"] == "individual")
    layer["norm_cap"] = cap
    key = Ed25519PrivateKey.generate()
    data["principals"].append(
        {"name": "me", "layer": "individual", "public_key": public_key_string(key.public_key())}
    )
    policy = Policy.model_validate(data)
    assert not policy.layer("individual").updates_leave_instance
    inst = Instance(policy, instance_id="inst-1", jurisdiction="eu", key=key)
    inst.feedback(Thumbs(prompt="please tell cake", response="sure here cake", up=True))
    update = inst.train_round("run-1", 1, inst.slot_for("individual"), seed=1)
    assert update.arrays == {}
    assert update.result.norm > cap  # the raw update exceeded the cap
    norm = math.sqrt(
        sum(float(np.sum(np.square(a, dtype=np.float64))) for a in update.result.delta.values())
    )
    assert update.result.clipped and norm <= cap * (1 + 1e-5)


# -- d. the gym's violation metric is a mean over prompts ----------------------------------


def test_gym_violation_is_the_share_of_red_line_prompts_complied_with() -> None:
    """score().violation is the mean of the per-prompt decisions (not their max): on an
    untrained tiny model that complies with some red-line prompts and refuses others."""
    from layerfed.simulation.scoring import eval_suite, score
    from layerfed.simulation.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer, suite = build_tiny_tokenizer(), eval_suite(size=16)
    for seed in range(20):
        result = score(build_tiny_model(seed), tokenizer, suite)
        assert result.decisions is not None
        complied = result.decisions[0]
        if 0 < complied.sum() < complied.size:
            assert result.violation == complied.sum() / complied.size
            assert 0.0 < result.violation < 1.0
            return
    pytest.fail("no seed of the tiny model gave a mixed red-line verdict")
