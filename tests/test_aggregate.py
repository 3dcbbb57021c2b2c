"""Robust aggregators: hand computations, Flower's strategies, invariants, the fused path."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from layerfed.errors import LayerfedError
from layerfed.federation import aggregate as agg
from layerfed.federation.aggregate import (
    AggregationError,
    Reply,
    aggregate,
    fedavg,
    krum,
    krum_scores,
    median,
    trimmed_mean,
    validate_and_aggregate,
)
from layerfed.federation.validate import CHUNK, ReplyChecks
from layerfed.governance.schema import Aggregator

SHAPES = {"a": (3, 4), "b": (5,)}


def _replies(n: int, seed: int = 0, spread: float = 1.0) -> list[Reply]:
    rng = np.random.default_rng(seed)
    return [
        Reply(
            {k: (rng.standard_normal(s) * spread).astype(np.float32) for k, s in SHAPES.items()},
            float(rng.integers(1, 50)),
            f"c{i}",
        )
        for i in range(n)
    ]


def _records(replies: list[Reply]) -> list[RecordDict]:
    return [
        RecordDict(
            {
                "arrays": ArrayRecord({k: Array(np.array(v)) for k, v in r.arrays.items()}),
                "metrics": MetricRecord({"num-examples": r.weight}),
            }
        )
        for r in replies
    ]


def _messages(replies: list[Reply]) -> list[Message]:
    out = []
    for i, content in enumerate(_records(replies)):
        meta = Metadata(
            run_id=1,
            message_id="",
            src_node_id=i + 1,
            dst_node_id=0,
            reply_to_message_id="m",
            group_id="1",
            created_at=time.time(),
            ttl=60.0,
            message_type="train",
        )
        out.append(Message(content=content, metadata=meta))  # type: ignore[call-overload]
    return out


def _flower(result: Any) -> dict[str, NDArray[Any]]:
    arrays = result[0] if isinstance(result, tuple) else result
    return {k: v.numpy() for k, v in arrays.items()}


def _close(a: dict[str, NDArray[Any]], b: dict[str, NDArray[Any]], tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
        np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol)


def test_fedavg_is_the_weighted_mean() -> None:
    """FedAvg equals sum(w_i x_i) / sum(w_i) computed densely in float64."""
    replies = _replies(7)
    got = fedavg(replies)
    total = sum(r.weight for r in replies)
    for k in SHAPES:
        want = np.sum([r.weight * r.arrays[k].astype(np.float64) for r in replies], axis=0)
        np.testing.assert_allclose(got[k], (want / total).astype(np.float32), rtol=1e-7, atol=1e-7)


def test_fedavg_matches_flower() -> None:
    """FedAvg gives Flower's aggregate_arrayrecords numbers on the same replies."""
    replies = _replies(9, seed=1)
    _close(fedavg(replies), _flower(aggregate_arrayrecords(_records(replies), "num-examples")))


def test_fedavg_spans_many_blocks() -> None:
    """Arrays longer than one accumulation block average correctly."""
    rng = np.random.default_rng(2)
    replies = [
        Reply({"w": rng.standard_normal(3 * CHUNK + 5).astype(np.float32)}, i + 1.0, f"c{i}")
        for i in range(4)
    ]
    want = sum(r.weight * r.arrays["w"].astype(np.float64) for r in replies) / 10.0
    np.testing.assert_allclose(fedavg(replies)["w"], want, rtol=1e-6, atol=1e-7)


def test_trimmed_mean_by_hand_and_against_flower() -> None:
    """Trimmed mean cuts int(f*n) values per end per coordinate, as FedTrimmedAvg does."""
    replies = _replies(10, seed=3)
    got = trimmed_mean(replies, 0.2)
    for k in SHAPES:
        stacked = np.sort(np.stack([r.arrays[k] for r in replies]), axis=0)
        np.testing.assert_allclose(got[k], stacked[2:8].mean(axis=0), rtol=1e-6, atol=1e-6)
    _close(got, _flower(FedTrimmedAvg(beta=0.2).aggregate_train(1, _messages(replies))))


def test_median_by_hand_and_against_flower() -> None:
    """Median is coordinate-wise (middle pair averaged) and equals FedMedian's."""
    replies = _replies(6, seed=4)
    got = median(replies)
    for k in SHAPES:
        stacked = np.sort(np.stack([r.arrays[k] for r in replies]), axis=0)
        np.testing.assert_allclose(got[k], (stacked[2] + stacked[3]) / 2, rtol=1e-6)
    _close(got, _flower(FedMedian().aggregate_train(1, _messages(replies))))


def test_coordinatewise_aggregators_span_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Median and trimmed mean give the same result however the columns are blocked."""
    replies = _replies(5, seed=5)
    whole = median(replies), trimmed_mean(replies, 0.2)
    monkeypatch.setattr(agg, "BLOCK", 7)
    for a, b in zip(whole, (median(replies), trimmed_mean(replies, 0.2)), strict=True):
        for k in SHAPES:
            np.testing.assert_array_equal(a[k], b[k])


def _with_outliers(seed: int) -> list[Reply]:
    replies = _replies(8, seed=seed, spread=0.01)
    rng = np.random.default_rng(seed)
    for i in (2, 5):
        arrays = {k: (rng.standard_normal(s) * 50).astype(np.float32) for k, s in SHAPES.items()}
        replies[i] = Reply(arrays, replies[i].weight, replies[i].client_id)
    return replies


def test_krum_by_hand_and_against_flower() -> None:
    """Krum picks the reply with the least summed distance to its n-f-2 nearest, as Flower does."""
    replies = _with_outliers(6)
    flat = np.stack([np.concatenate([r.arrays[k].ravel() for k in SHAPES]) for r in replies])
    flat = flat.astype(np.float64)
    dist = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    scores = [np.sort(np.delete(dist[i], i))[:4].sum() for i in range(8)]
    np.testing.assert_allclose(krum_scores(replies, 2), scores, rtol=1e-9)
    best = int(np.argmin(scores))
    got = krum(replies, byzantine=2)
    for k in SHAPES:
        np.testing.assert_array_equal(got[k], replies[best].arrays[k])
    _close(got, _flower(Krum(num_malicious_nodes=2).aggregate_train(1, _messages(replies))))


def test_multikrum_matches_flower_and_drops_outliers() -> None:
    """Multi-Krum averages the m best replies (weighted) and never picks the outliers."""
    replies = _with_outliers(7)
    flower = MultiKrum(num_malicious_nodes=2, num_nodes_to_select=4)
    _close(krum(replies, 2, multi=4), _flower(flower.aggregate_train(1, _messages(replies))))
    result = aggregate(replies, Aggregator(kind="krum", byzantine=2))
    assert set(result.dropped) >= {"c2", "c5"} and len(result.used) == 1


def test_aggregate_dispatches_by_kind() -> None:
    """aggregate() runs the policy's aggregator and reports every reply as used."""
    replies = _replies(5, seed=8)
    cases = [
        (Aggregator(kind="fedavg"), fedavg(replies)),
        (Aggregator(kind="median"), median(replies)),
        (Aggregator(kind="trimmed_mean", trim_fraction=0.2), trimmed_mean(replies, 0.2)),
        (Aggregator(kind="trimmed_mean"), trimmed_mean(replies, agg.DEFAULT_TRIM_FRACTION)),
    ]
    for aggregator, want in cases:
        result = aggregate(replies, aggregator)
        assert result.used == tuple(r.client_id for r in replies) and result.dropped == ()
        for k in SHAPES:
            np.testing.assert_array_equal(result.arrays[k], want[k])


@pytest.mark.parametrize(
    ("replies", "field"),
    [
        ([], "replies"),
        ([Reply({"a": np.zeros(2, np.float32)}, 0.0, "x")], "reply 'x'.weight"),
        ([Reply({"a": np.zeros(2, np.float32)}, float("nan"), "x")], "reply 'x'.weight"),
        ([Reply({"a": np.zeros(2, np.int32)}, 1.0, "x")], "array 'a'.dtype"),
        (
            [Reply({"a": np.zeros(2, np.float32)}, 1.0, "x")] * 2,
            "replies.client_id",
        ),
        (
            [
                Reply({"a": np.zeros(2, np.float32)}, 1.0, "x"),
                Reply({"a": np.zeros(3, np.float32)}, 1.0, "y"),
            ],
            "reply 'y'.arrays",
        ),
    ],
)
def test_bad_replies_raise_typed_errors(replies: list[Reply], field: str) -> None:
    """Empty, unweighted, non-float, duplicate or unlike replies raise AggregationError."""
    with pytest.raises(AggregationError) as info:
        fedavg(replies)
    assert info.value.field == field and isinstance(info.value, LayerfedError)


def test_bad_settings_raise_typed_errors() -> None:
    """An out-of-range trim fraction, byzantine count or multi raises AggregationError."""
    replies = _replies(3)
    with pytest.raises(AggregationError, match="trim_fraction"):
        trimmed_mean(replies, 0.5)
    with pytest.raises(AggregationError, match="byzantine"):
        krum(replies, -1)
    with pytest.raises(AggregationError, match="multi"):
        krum(replies, 0, multi=4)


floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)
vectors = st.lists(floats, min_size=1, max_size=6)
weights = st.floats(0.01, 1e4)


def _from(rows: list[list[float]], ws: list[float]) -> list[Reply]:
    width = min(len(r) for r in rows)
    return [
        Reply({"v": np.array(r[:width], np.float32)}, w, f"c{i}")
        for i, (r, w) in enumerate(zip(rows, ws, strict=False))
    ]


@settings(max_examples=60, deadline=None)
@given(vectors, st.lists(weights, min_size=1, max_size=8))
def test_fedavg_of_identical_replies_is_that_reply(row: list[float], ws: list[float]) -> None:
    """FedAvg of copies of one float32 reply returns exactly that reply, whatever the weights."""
    replies = _from([row] * len(ws), ws)
    np.testing.assert_array_equal(fedavg(replies)["v"], replies[0].arrays["v"])


@settings(max_examples=60, deadline=None)
@given(st.lists(vectors, min_size=1, max_size=9), st.floats(0.0, 0.49))
def test_median_and_trimmed_mean_stay_within_range(rows: list[list[float]], cut: float) -> None:
    """Median and trimmed mean lie within the coordinate-wise min and max of the replies."""
    replies = _from(rows, [1.0] * len(rows))
    stacked = np.stack([r.arrays["v"] for r in replies])
    for out in (median(replies)["v"], trimmed_mean(replies, cut)["v"]):
        tol = 1e-6 * (1 + np.abs(stacked).max())
        assert np.all(out >= stacked.min(axis=0) - tol) and np.all(out <= stacked.max(axis=0) + tol)


@settings(max_examples=60, deadline=None)
@given(st.lists(vectors, min_size=2, max_size=8), st.data())
def test_fedavg_is_permutation_and_scale_invariant(rows: list[list[float]], data: Any) -> None:
    """Shuffling the replies or scaling all weights by one factor leaves FedAvg unchanged."""
    ws = data.draw(st.lists(weights, min_size=len(rows), max_size=len(rows)))
    replies = _from(rows, ws)
    base = fedavg(replies)["v"]
    order = data.draw(st.permutations(range(len(replies))))
    factor = data.draw(st.floats(1e-3, 1e3))
    shuffled = [replies[i] for i in order]
    scaled = [Reply(r.arrays, r.weight * factor, r.client_id) for r in replies]
    scale = 1e-5 * (1 + float(np.abs(base).max()))
    np.testing.assert_allclose(fedavg(shuffled)["v"], base, rtol=1e-6, atol=scale)
    np.testing.assert_allclose(fedavg(scaled)["v"], base, rtol=1e-6, atol=scale)


def _checks(cap: float | None, clip: bool) -> ReplyChecks:
    expected = {k: (s, np.float32) for k, s in SHAPES.items()}
    return ReplyChecks(expected, norm_cap=cap, clip=clip)


def _reference(replies: list[Reply], aggregator: Aggregator, checks: ReplyChecks) -> Any:
    survivors = []
    for r in replies:
        v = checks.validate(r.arrays)
        if v.ok and r.weight > 0:
            survivors.append(Reply(v.arrays, r.weight, r.client_id))
    return aggregate(survivors, aggregator)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["fedavg", "median", "trimmed_mean", "krum"]),
    st.lists(st.sampled_from(["ok", "nan", "big", "shape", "weight"]), min_size=1, max_size=7),
    st.booleans(),
)
def test_validate_and_aggregate_equals_validate_then_aggregate(
    kind: str, faults: list[str], clip: bool
) -> None:
    """The fused path refuses the same replies and returns exactly validate + aggregate."""
    replies = _replies(len(faults), seed=len(faults))
    for i, fault in enumerate(faults):
        arrays, weight = dict(replies[i].arrays), replies[i].weight
        if fault == "nan":
            arrays["b"] = np.array([0, 1, np.nan, 2, 3], np.float32)
        elif fault == "big":
            arrays["a"] = arrays["a"] * 100
        elif fault == "shape":
            arrays["b"] = np.zeros(6, np.float32)
        elif fault == "weight":
            weight = -1.0
        replies[i] = Reply(arrays, weight, replies[i].client_id)
    checks, aggregator = _checks(50.0, clip), Aggregator.model_validate({"kind": kind})
    outcome = validate_and_aggregate(replies, aggregator, checks)
    bad = {"nan", "shape", "weight"} | (set() if clip else {"big"})
    assert outcome.refused == tuple(
        r.client_id for r, f in zip(replies, faults, strict=True) if f in bad
    )
    assert outcome.validations["c0"].ok == (faults[0] not in bad)
    if len(outcome.refused) == len(replies):
        assert outcome.result is None
        return
    want = _reference(replies, aggregator, checks)
    assert outcome.result is not None and outcome.result.used == want.used
    for k in SHAPES:
        np.testing.assert_array_equal(outcome.result.arrays[k], want.arrays[k])


def test_refusal_reasons_and_min_clients() -> None:
    """A bad weight is refused as bad_weight; too few survivors leave the slot un-updated."""
    replies = _replies(3)
    replies[1] = Reply(replies[1].arrays, float("inf"), "c1")
    outcome = validate_and_aggregate(replies, Aggregator(), _checks(None, False), min_clients=3)
    assert outcome.validations["c1"].reason == "bad_weight"
    assert outcome.refused == ("c1",) and outcome.result is None
    ok = validate_and_aggregate(replies, Aggregator(), _checks(None, False), min_clients=2)
    assert ok.result is not None and ok.result.used == ("c0", "c2")


def _load_bench() -> Any:
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_aggregation.py"
    spec = importlib.util.spec_from_file_location("bench_aggregation", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_paths_agree_on_a_small_case(tmp_path: Path) -> None:
    """The benchmark's layered and Flower paths give the same weighted mean and a JSON report."""
    bench = _load_bench()
    out = tmp_path / "agg.json"
    report = bench.main(["--replies", "4", "--size", "4096", "--repeats", "1", "--out", str(out)])
    assert out.exists() and len(report["cases"]) == 2
    for case in report["cases"]:
        assert case["max_abs_diff"] < 1e-9 and case["ratio"] > 0
