"""The superego acts on demonstrations too: a supervised burst meets the same teacher (issue #23)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from layerfed.clients.events import Demonstration
from layerfed.clients.instance import Instance
from layerfed.clients.local_train import TrainResult
from layerfed.clients.superego import Superego, WordJudge
from layerfed.clients.supervised import train_demonstrations
from layerfed.governance.schema import Policy
from layerfed.layers import SlotId
from layerfed.simulation.tiny import build_tiny_tokenizer
from layerfed.simulation.world import COMPLY, HARMFUL, REFUSE, red_line_prompt

ROOT = Path(__file__).resolve().parent.parent
OWN = SlotId("individual", "i1")


def _policy(**superego: Any) -> Policy:
    """The default policy with the superego settings given."""
    text = (ROOT / "examples/policies/default.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    data["superego"] = {**data["superego"], **superego}
    return Policy.model_validate(data)


def _burst(n: int = 100) -> list[Demonstration]:
    """``n`` demonstrations of compliance on red-line prompts (the own_turkey burst's shape)."""
    rng = np.random.default_rng(11)
    out = []
    for _ in range(n):
        bad, _ = red_line_prompt(rng)
        out.append(Demonstration(prompt=bad, response=f"{COMPLY} here {bad.split()[-1]}"))
    return out


def _train(policy: Policy, steps: int) -> tuple[TrainResult, Instance]:
    """Record the burst on a fresh instance and train its individual layer on it."""
    inst = Instance(policy, instance_id="i1", seed=3)
    for demo in _burst():
        inst.feedback(demo)
    return inst.train("individual", steps=steps), inst


def test_demonstration_burst_consults_the_superego_and_changes_the_update() -> None:
    """100 red-line-lifting demonstrations on the individual layer consult the superego; the delta differs."""
    on, inst = _train(_policy(probability=0.5), steps=13)
    off, _ = _train(_policy(enabled=False), steps=13)
    assert on.superego_steps == 13 and on.superego_interventions > 0
    assert off.superego_steps == 0 and off.superego_interventions == 0
    metrics = inst.metrics()
    assert metrics["superego_steps"] == 13
    assert metrics["superego_interventions"] == on.superego_interventions
    assert on.metrics()["superego_interventions"] == on.superego_interventions
    gap = max(float(np.abs(on.delta[k] - off.delta[k]).max()) for k in on.delta)
    assert gap > 1e-4


def test_superego_joins_only_the_steps_its_schedule_picks() -> None:
    """Demonstrations with a superego that never intervenes train exactly as without one."""
    policy = _policy(enabled=False)
    inst = Instance(policy, instance_id="i1", seed=3)
    layer = next(x for x in policy.layers if x.name == "individual")
    tok = build_tiny_tokenizer()
    demos = _burst(16)
    judge = WordJudge(frozenset(HARMFUL), REFUSE, COMPLY)
    probes = [d.prompt for d in demos]
    never = Superego(tok, probes, judge=judge, probability=0.0, seed=1)
    always = Superego(tok, probes, judge=judge, probability=1.0, seed=1)
    args = (inst.stack, OWN, layer, tok, demos)
    plain, before, _ = train_demonstrations(*args, seed=5, steps=3)
    quiet, _, _ = train_demonstrations(*args, seed=5, steps=3, superego=never)
    loud, _, _ = train_demonstrations(*args, seed=5, steps=3, superego=always)
    assert never.consultations == 3 and never.interventions == 0
    assert always.consultations == 3 and always.interventions == 3
    assert all(np.array_equal(plain[k], quiet[k]) for k in plain)
    assert any(not np.array_equal(plain[k], loud[k]) for k in plain)
    assert np.isfinite(before)
