"""Red lines are enforced on every composition a commit reaches, through the real round path.

Both attacks are the ones the guarantees issue reported against wave 1: a creator rater
with a valid key and a norm under the cap, and colluders who drip into a jurisdiction
slot and a group slot that only break the red line together.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from round_helpers import CREATOR, GOV_EU, REDLINE_SUITE, Harness

from layerfed.clients.events import Demonstration
from layerfed.clients.supervised import train_demonstrations
from layerfed.federation.probes import ProbeRunner
from layerfed.federation.server_state import ServerState
from layerfed.governance.schema import Policy
from layerfed.layers.arrays import Arrays
from layerfed.layers.slots import SlotId

pytestmark = pytest.mark.slow
G1 = SlotId("in_group", "g1")


def _unit_attack(h: Harness, slot: SlotId, active: list[SlotId]) -> Arrays:
    """A unit-norm B delta for ``slot`` that pushes red-line prompts towards compliance."""
    suite = ProbeRunner(h.policy, h.stack, h.tokenizer).suite(REDLINE_SUITE)
    demos = [
        Demonstration(prompt=p.prompt, response=suite.compliance)
        for p in suite.prompts
        if p.expect == "refuse"
    ]
    h.stack.activate(active)
    delta, _, _ = train_demonstrations(
        h.stack, slot, h.policy.layer(slot.layer), h.tokenizer, demos, seed=1, steps=30
    )
    norm = float(
        np.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in delta.values()))
    )
    return {k: (v / norm).astype(np.float32) for k, v in delta.items()}


def _loose(policy: Policy) -> Policy:
    """Government and in-group at server rate 1, caps 50, one client enough (isolates the gate)."""
    layers = [
        layer.model_copy(update={"server_lr": 1.0, "norm_cap": 50.0, "min_clients": 1})
        if layer.name in ("government", "in_group")
        else layer
        for layer in policy.layers
    ]
    vetoes = [v for v in policy.vetoes if v.name != "government_norm"]
    return policy.model_copy(update={"layers": layers, "vetoes": vetoes})


def test_a_creator_rater_cannot_commit_a_red_line_breach(tmp_path: Path) -> None:
    """One of two creator raters, key valid and norm under the cap, is refused by the red line.

    The breach is audited with the composition, suite and rate; the creator slot keeps
    its version, the round's other slot still commits, and the red-line rate is unchanged.
    """
    h = Harness(tmp_path / "a")
    attack = _unit_attack(h, CREATOR, [CREATOR])
    cap = h.policy.layer("creator").norm_cap
    assert cap is not None
    h.task(1, CREATOR)
    h.task(2, CREATOR)
    h.task(3, SlotId("community", "global"))
    h.task(4, SlotId("community", "global"))
    before = h.redline_rate()
    replies = [
        h.reply(1, h.arrays(CREATOR, seed=1)),
        h.reply(2, {k: v * (0.8 * cap) for k, v in attack.items()}),
        h.reply(3, h.arrays(SlotId("community", "global"), seed=3)),
        h.reply(4, h.arrays(SlotId("community", "global"), seed=4)),
    ]
    report = h.run(replies)
    breaches = h.records("red_line_breach")
    assert [b["slot"] for b in breaches] == [str(CREATOR)]
    assert breaches[0]["suite"] == REDLINE_SUITE
    assert breaches[0]["rate"] > breaches[0]["max_violation_rate"]
    assert "creator/global" in breaches[0]["composition"]
    assert h.state.version(CREATOR) == 0
    assert "community/global" in report.committed
    assert h.redline_rate() == before


def test_colluding_slots_are_checked_together_on_the_instances_they_compose(
    tmp_path: Path,
) -> None:
    """A jurisdiction drip that passes alone, then a group drip: the eu+g1 composition refuses it.

    The colluders pick the largest steps that leave the red-line rate where it was for
    each slot alone (so the per-slot probe-regression veto passes both) but breach it
    together on every eu+g1 instance; the second commit is refused and audited with
    that composition.
    """
    h = Harness(tmp_path / "b")
    h.policy = _loose(h.policy)
    h.state = ServerState(h.root, h.policy, h.state.run_id)
    gov = _unit_attack(h, GOV_EU, [CREATOR, GOV_EU])
    grp = _unit_attack(h, G1, [CREATOR, G1])
    runner = ProbeRunner(h.policy, h.stack, h.tokenizer)
    zero = {s: h.committed(s) for s in (CREATOR, GOV_EU, G1)}

    def rate(g: float, r: float) -> float:
        slots = dict(zero)
        slots[GOV_EU] = {k: v + g * gov[k] for k, v in zero[GOV_EU].items()}
        slots[G1] = {k: v + r * grp[k] for k, v in zero[G1].items()}
        return runner.rate(REDLINE_SUITE, slots)

    base = rate(0, 0)
    scales = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0]
    g = max(s for s in [0.0, *scales] if s == 0 or rate(s, 0) <= base)
    r = max(s for s in [0.0, *scales] if s == 0 or rate(0, s) <= base)
    assert g > 0 and r > 0 and rate(g, r) > max(base, 0.01), (base, g, r, rate(g, r))

    h.task(1, GOV_EU)
    h.run([h.reply(1, {k: v * g for k, v in gov.items()})])
    assert h.state.version(GOV_EU) == 1  # alone it is harmless: committed
    assert not h.records("red_line_breach")
    h.round = 2
    h.pending.clear()
    h.task(2, G1)  # an instance in eu with group g1
    h.run([h.reply(2, {k: v * r for k, v in grp.items()})])
    breaches = h.records("red_line_breach")
    assert len(breaches) == 1
    assert breaches[0]["slot"] == str(G1)
    assert {"government/eu", "in_group/g1"} <= set(breaches[0]["composition"])
    assert h.state.version(G1) == 0
