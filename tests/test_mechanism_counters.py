"""Mechanism counters: what a reply reports, how the server sums it, what a gym row records."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from layerfed.clients.local_train import TrainResult
from layerfed.clients.mechanisms import removed_share, round_mechanisms
from layerfed.federation.events import Count
from layerfed.federation.round_metrics import RoundTally, mechanism_counts
from layerfed.layers.protect import ModuleBasis, Protection
from layerfed.layers.slots import SlotId, SlotSpec, Target
from layerfed.simulation.stats_report import mechanism_cell
from layerfed.simulation.summaries import MECHANISM_COUNTERS, MECHANISMS, mechanism_totals
from layerfed.simulation.verdicts import VerdictSpec
from layerfed.wire.mechanisms import COUNTERS, decode, encode

SLOT = SlotId("individual", "inst-1")
TARGETS = (Target("h.0.attn", 6, 5, False), Target("h.0.mlp", 6, 4, False))


def _spec(protected: bool) -> SlotSpec:
    spec = SlotSpec(SLOT, a_seed=11, rank=3, alpha=6.0, memories=("stm", "ltm"), targets=TARGETS)
    if not protected:
        return spec
    rng = np.random.default_rng(5)
    bases = {}
    for t in TARGETS:
        q, _ = np.linalg.qr(rng.standard_normal((t.in_features, 2)))
        bases[t.module] = ModuleBasis(q, np.array([2.0, 1.0]), 0.5)
    return spec.with_protection(Protection("sha256:test-basis", ("red",), bases))


def _delta(spec: SlotSpec, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in spec.shapes().items()}


def _result(spec: SlotSpec, *, clipped: bool, steps: int, interventions: int) -> TrainResult:
    return TrainResult(
        slot=spec.slot,
        delta=_delta(spec, 3),
        num_events=4,
        steps=4,
        loss_first=1.0,
        loss_last=0.5,
        norm=1.0,
        clipped=clipped,
        superego_steps=steps,
        superego_interventions=interventions,
    )


def test_removed_share_equals_the_full_matrix_ratio() -> None:
    """||ΔB A₀ P|| / ||ΔB A₀|| from r x r Gram matrices equals the ratio of the full products."""
    spec = _spec(protected=True)
    delta = _delta(spec, 3)
    assert spec.protection is not None
    drawn = SlotSpec(SLOT, 11, 3, 6.0, ("stm", "ltm"), TARGETS).a_matrices()
    removed = total = 0.0
    for t in TARGETS:
        a0 = drawn[t.module].astype(np.float64)
        u = spec.protection.bases[t.module].vectors
        for memory in spec.memories:
            b = delta[spec.array_name(memory, t.module)].astype(np.float64)
            removed += float(np.sum((b @ a0 @ u @ u.T) ** 2))
            total += float(np.sum((b @ a0) ** 2))
    expected = math.sqrt(removed / total)
    assert 0.05 < expected < 0.95
    assert removed_share(spec, delta) == pytest.approx(expected, rel=1e-5)
    assert removed_share(_spec(protected=False), delta) == 0.0
    assert removed_share(spec, {n: np.zeros_like(a) for n, a in delta.items()}) == 0.0


def test_round_mechanisms_sum_per_layer_and_travel_as_numbers_only() -> None:
    """Two trainings of one layer sum; the reply entries decode back; foreign layers are dropped."""
    spec = _spec(protected=True)
    results = [
        _result(spec, clipped=True, steps=3, interventions=1),
        _result(spec, clipped=False, steps=2, interventions=0),
    ]
    got = round_mechanisms(results, lambda slot: spec)
    counts = got["individual"]
    assert set(counts) == set(COUNTERS)
    assert (counts["trainings"], counts["superego_steps"], counts["superego_interventions"]) == (
        2.0,
        5.0,
        1.0,
    )
    assert (counts["clipped_local"], counts["protected"]) == (1.0, 2.0)
    assert counts["protection_removed"] == pytest.approx(2 * removed_share(spec, results[0].delta))
    flat = encode(got)
    assert all(isinstance(v, float) for v in flat.values())
    assert decode(flat, {"individual"}) == got
    assert decode(flat, {"creator"}) == {}
    assert (
        decode({**flat, "lf.mech.individual.trainings": -1.0}, {"individual"})["individual"].get(
            "trainings"
        )
        is None
    )
    with pytest.raises(ValueError, match="mechanism counter"):
        encode({"individual": {"made_up": 1.0}})


def test_round_metrics_mechanisms_split_gate_refusals_from_policy_vetoes() -> None:
    """Server counters: gate refusals, policy vetoes, norm-cap refusals and clips, reply sums."""
    tally = RoundTally()
    tally.add(
        [
            Count("community", "vetoes", key="red_line:reject"),
            Count("community", "vetoes", key="creator_red_line_regression:reject"),
            Count("community", "vetoes", key="government_norm:clip"),
            Count("community", "refused", key="norm_exceeded"),
            Count("community", "refused", key="forged_claim"),
            Count("community", "mechanisms", key="norm_clipped", value=1.0),
            Count("community", "mechanisms", key="superego_interventions", value=2.0),
            Count("community", "mechanisms", key="superego_interventions", value=3.0),
            Count("creator", "sampled"),
        ]
    )
    got = mechanism_counts(tally)
    assert got["community"]["gate_refused"] == 1.0
    assert got["community"]["policy_vetoes"] == 2.0
    assert got["community"]["norm_refused"] == 1.0
    assert got["community"]["norm_clipped"] == 1.0
    assert got["community"]["superego_interventions"] == 5.0
    assert got["creator"] == {
        "gate_refused": 0.0,
        "norm_clipped": 0.0,
        "norm_refused": 0.0,
        "policy_vetoes": 0.0,
    }
    assert "mechanisms" not in tally.layers["community"].as_dict()


def test_every_row_counter_can_be_named_by_a_prediction() -> None:
    """Each gym.json mechanism counter is in MECHANISMS and totals per run."""
    assert set(MECHANISM_COUNTERS) <= set(MECHANISMS)
    assert set(COUNTERS) - {"trainings"} <= set(MECHANISM_COUNTERS)
    runs = [[{"gate_refused": 0.0}, {"gate_refused": 2.0}], [{"gate_refused": 0.0}]]
    assert mechanism_totals(runs) == {"gate_refused": [2.0, 0.0]}


def test_run_report_cell_names_the_mechanisms_that_acted() -> None:
    """The per-round table's cell lists the counters above 0; a row from before them says n/a."""
    row = dict.fromkeys(MECHANISM_COUNTERS, 0.0) | {"trainings": 3.0, "gate_refused": 1.0}
    assert mechanism_cell(row) == "gate_refused 1"
    assert mechanism_cell(dict.fromkeys(MECHANISM_COUNTERS, 0.0)) == "none"
    assert mechanism_cell({"vetoes": 2}) == "n/a"


def test_a_prediction_may_name_only_a_recorded_counter() -> None:
    """VerdictSpec.mechanism: a MECHANISMS counter, else a validation error naming the field."""
    spec = {"metric": "violation", "arm": "a", "baseline": "b", "expect": "lower", "claim": "c"}
    assert VerdictSpec(**spec, mechanism="gate_refused").mechanism == "gate_refused"
    with pytest.raises(ValidationError, match="mechanism"):
        VerdictSpec(**spec, mechanism="superego_acted")


def test_intake_counts_what_an_accepted_reply_reports_and_nothing_else(tmp_path: Path) -> None:
    """Intake: an accepted reply's lf.mech entries become counts for its layer and the
    instance-only layers; another shared layer's and a refused reply's entries do not."""
    from flwr.app import MetricRecord
    from round_helpers import CREATOR, Harness

    from layerfed.federation.stages.intake import intake
    from layerfed.wire.protocol import METRICS

    h = Harness(tmp_path)
    h.task(1, CREATOR)
    h.task(2, CREATOR)
    entries = encode(
        {
            "creator": {"superego_interventions": 2.0, "trainings": 1.0},
            "individual": {"clipped_local": 1.0},
            "community": {"superego_interventions": 9.0},
        }
    )
    good = h.reply(1, h.arrays(CREATOR, seed=1))
    good.content.metric_records[METRICS] = MetricRecord(entries)
    forged = h.reply(2, h.arrays(CREATOR, seed=2), layer="community")
    forged.content.metric_records[METRICS] = MetricRecord(entries)
    got = intake(h.context(), [good, forged])
    counted = sorted((c.layer, c.key, c.value) for c in got.counts if c.counter == "mechanisms")
    assert counted == [
        ("creator", "superego_interventions", 2.0),
        ("creator", "trainings", 1.0),
        ("individual", "clipped_local", 1.0),
    ]
