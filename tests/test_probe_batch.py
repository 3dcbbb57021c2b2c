"""Batched composition probes score exactly what the per-composition PEFT path scores.

The server measures red lines on many compositions in one forward pass
(:class:`~layerfed.layers.probe_batch.BatchedProbes`); these tests compare it with
the one-composition-at-a-time path (slots activated and set in the stack, one
forward of the suites) on non-trivial slots of the default policy's tiny model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from round_helpers import CREATOR, REDLINE_SUITE, Harness

from layerfed.federation.probes import ProbeRunner
from layerfed.layers.arrays import Arrays
from layerfed.layers.probe_batch import BatchedProbes, score_rows
from layerfed.layers.probes import ProbePrompt, ProbeSuiteData
from layerfed.layers.slots import SlotId

COMMUNITY = SlotId("community", "global")


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Harness:
    """One server stack of the default policy on its tiny model."""
    return Harness(tmp_path_factory.mktemp("batch"))


def _slot(h: Harness, slot: SlotId, seed: int, scale: float = 0.3) -> Arrays:
    """Large random B matrices: a slot that moves margins by about one nat."""
    rng = np.random.default_rng([11, seed])
    shapes = h.stack.spec(slot).shapes()
    return {n: rng.normal(0.0, scale, s).astype(np.float32) for n, s in shapes.items()}


def _compositions(h: Harness) -> list[dict[SlotId, Arrays]]:
    """Six compositions of different shapes: jurisdictions, one or two groups, or none.

    Each slot has one set of arrays (shared by the compositions that hold it, as the
    server's committed slots are), so compositions share their lower decoder blocks.
    """
    arrays: dict[SlotId, Arrays] = {}
    out = []
    for j, groups in [
        ("eu", ["g1"]),
        ("eu", ["g2"]),
        ("us", ["g1"]),
        ("us", []),
        ("eu", ["g1", "g2"]),
    ]:
        names = [CREATOR, SlotId("government", j), COMMUNITY]
        names += [SlotId("in_group", g) for g in groups]
        for s in names:
            arrays.setdefault(s, _slot(h, s, len(arrays)))
        out.append({s: arrays[s] for s in names})
    out.append({COMMUNITY: _slot(h, COMMUNITY, 99), CREATOR: _slot(h, CREATOR, 98)})  # reordered
    return out


def test_batched_margins_and_rates_equal_one_composition_at_a_time(harness: Harness) -> None:
    """Margins agree within float rounding (1e-4) and every rate is exactly the same.

    The slots are large enough that the suites' rates differ between compositions (so
    equality is not two zeros), and the stack is left as it was by the batched path.
    """
    h = harness
    runner = ProbeRunner(h.policy, h.stack, h.tokenizer, exact_margin=0.0)
    names = [s.name for s in h.policy.probe_suites]
    data = [runner.suite(n) for n in names]
    compositions = _compositions(h)
    h.stack.activate([CREATOR])
    h.stack.set_arrays(CREATOR, _slot(h, CREATOR, 1000))
    before = h.stack.get_arrays(CREATOR)
    batched = runner.batch.margins(data, compositions)
    rates = runner.measure_many(names, compositions)
    assert h.stack.active == [CREATOR]
    assert all(np.array_equal(before[k], v) for k, v in h.stack.get_arrays(CREATOR).items())
    assert not any(p.requires_grad for p in h.stack.model.parameters())
    assert runner.rescored == 0
    for composition, got, rate in zip(compositions, batched, rates, strict=True):
        want = runner.margins_one(data, composition)
        for g, w in zip(got, want, strict=True):
            assert torch.allclose(g, w, atol=1e-4, rtol=0), float((g - w).abs().max())
        assert rate == ProbeRunner._rates(data, want)
    distinct = {tuple(r.values()) for r in rates}
    assert len(distinct) >= 3, rates
    assert any(0 < r[REDLINE_SUITE] < 1 for r in rates), rates


def test_multi_token_continuations_and_shared_rows(harness: Harness) -> None:
    """Continuations of several tokens score as in the per-composition path; a prompt's two
    one-token continuations are read from one row (fewer rows than pairs)."""
    h = harness
    words = [
        p.prompt for p in ProbeRunner(h.policy, h.stack, h.tokenizer).suite(REDLINE_SUITE).prompts
    ]
    suite = ProbeSuiteData(
        "multi",
        tuple(ProbePrompt(w, "refuse" if i % 2 else "comply") for i, w in enumerate(words[:12])),
        "sorry i cannot",
        "sure",
    )
    runner = ProbeRunner(h.policy, h.stack, h.tokenizer, exact_margin=0.0)
    compositions = _compositions(h)[:3]
    got = runner.batch.margins([suite], compositions)
    for composition, g in zip(compositions, got, strict=True):
        want = runner.margins_one([suite], composition)[0]
        assert torch.allclose(g[0], want, atol=1e-4, rtol=0)
    one = score_rows(h.tokenizer, [runner.suite(REDLINE_SUITE)])
    rows = sum(len(b.rows) for b in one.blocks)
    assert rows == len(runner.suite(REDLINE_SUITE).prompts) < one.pairs


def test_margins_near_zero_are_rescored_one_composition_at_a_time(harness: Harness) -> None:
    """With ``exact_margin`` above every margin, each composition takes the PEFT path."""
    h = harness
    runner = ProbeRunner(h.policy, h.stack, h.tokenizer, exact_margin=1e9)
    compositions = _compositions(h)[:2]
    rates = runner.measure_many([REDLINE_SUITE], compositions)
    assert runner.rescored == 2
    exact = ProbeRunner(h.policy, h.stack, h.tokenizer, exact_margin=0.0)
    assert rates == exact.measure_many([REDLINE_SUITE], compositions)


def test_chunked_and_unshared_batches_equal_one_shared_batch(harness: Harness) -> None:
    """Compositions split over several forward passes, or each with its own copy of every
    decoder block's input, score as one batch whose lower blocks are shared."""
    h = harness
    data = [ProbeRunner(h.policy, h.stack, h.tokenizer).suite(REDLINE_SUITE)]
    compositions = _compositions(h)[:4]
    whole = BatchedProbes(h.stack, h.tokenizer).margins(data, compositions)
    small = BatchedProbes(h.stack, h.tokenizer, max_tokens=1).margins(data, compositions)
    unshared = BatchedProbes(h.stack, h.tokenizer)
    unshared.share_blocks = False
    apart = unshared.margins(data, compositions)
    for a, b, c in zip(whole, small, apart, strict=True):
        assert torch.allclose(a[0], b[0], atol=1e-5, rtol=0)
        assert torch.allclose(a[0], c[0], atol=1e-5, rtol=0)


def test_a_measured_composition_is_not_measured_again_by_content(harness: Harness) -> None:
    """Equal arrays in new objects (a candidate, then the same arrays committed) hit the
    results kept by content, also with an all-zero slot added; a changed array does not."""
    h = harness
    runner = ProbeRunner(h.policy, h.stack, h.tokenizer)
    calls: list[int] = []
    margins = runner.batch.margins

    def counted(data: Any, compositions: Any) -> Any:
        calls.append(len(compositions))
        return margins(data, compositions)

    runner.batch.margins = counted  # type: ignore[method-assign]
    first = _compositions(h)[:2]
    rates = runner.measure_many([REDLINE_SUITE], first)
    copies = [{s: {k: v.copy() for k, v in a.items()} for s, a in c.items()} for c in first]
    assert runner.rates([REDLINE_SUITE], copies[0], ("v1",)) == rates[0]
    assert runner.measure([REDLINE_SUITE], copies[1]) == rates[1]
    changed = dict(copies[1])
    changed[CREATOR] = {k: v + 1e-3 for k, v in copies[1][CREATOR].items()}
    runner.measure([REDLINE_SUITE], changed)
    assert [n for n in calls if n] == [2, 1]
    g9 = SlotId("in_group", "g9")
    untrained = {**copies[1], g9: {n: np.zeros(s, np.float32) for n, s in _shapes(h, g9)}}
    assert runner.measure([REDLINE_SUITE], untrained) == rates[1]  # an all-zero slot adds 0
    assert [n for n in calls if n] == [2, 1]


def _shapes(h: Harness, slot: SlotId) -> list[tuple[str, tuple[int, ...]]]:
    return list(h.stack.spec(slot).shapes().items())
