"""Benchmark 1: the layered aggregation path against Flower's FedAvg, side by side.

Both paths start from the same Flower replies (``RecordDict`` with one
``ArrayRecord`` and a ``num-examples`` metric). Flower's path is
``aggregate_arrayrecords``. The layered path decodes each array (zero-copy),
validates every reply in full (names, scope, red lines, size, dtype, shape,
finiteness, float64 norm under the cap) and takes the weighted mean. After a
warm-up, the two run alternately and the median of the repeats is kept.

    .venv/bin/python bench/bench_aggregation.py [--replies 100] [--size 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flwr
import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from layerfed.federation.aggregate import Reply, validate_and_aggregate
from layerfed.federation.validate import ReplyChecks, decode_npy
from layerfed.governance.patterns import matches_any
from layerfed.governance.schema import Aggregator
from numpy.typing import NDArray

__all__ = ["flower_path", "layered_path", "main", "make_replies", "run"]

RESULTS = Path(__file__).resolve().parent / "results" / "aggregation.json"
SCOPE = ["base_model.model.transformer.h.*.mlp.*.lora_*.weight"]
RED_LINES = ["**.wte.*", "**.ln_*.*", "lm_head.*"]


def _names(arrays: int) -> list[str]:
    return [
        f"base_model.model.transformer.h.{i // 2}.mlp.c_fc.lora_{'AB'[i % 2]}.weight"
        for i in range(arrays)
    ]


def make_replies(replies: int, size: int, arrays: int, seed: int = 0) -> list[RecordDict]:
    """``replies`` Flower replies, each ``size`` float32 numbers split over ``arrays`` arrays."""
    rng = np.random.default_rng(seed)
    per = size // arrays
    out = []
    for _ in range(replies):
        record = ArrayRecord(
            {n: Array(rng.standard_normal(per, dtype=np.float32) * 1e-3) for n in _names(arrays)}
        )
        metrics = MetricRecord({"num-examples": int(rng.integers(1, 100))})
        out.append(RecordDict({"arrays": record, "metrics": metrics}))
    return out


def flower_path(records: list[RecordDict]) -> dict[str, NDArray[Any]]:
    """Flower's FedAvg aggregation of the replies, as numpy arrays."""
    result = aggregate_arrayrecords(records, "num-examples")
    return {k: v.numpy() for k, v in result.items()}


def _checks(records: list[RecordDict]) -> ReplyChecks:
    first = records[0]["arrays"]
    assert isinstance(first, ArrayRecord)
    expected = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in first.items()}
    return ReplyChecks(
        expected=expected,
        in_scope=lambda name: matches_any(name, SCOPE),
        redline=lambda name: matches_any(name, RED_LINES),
        norm_cap=1e6,
        clip=True,
        max_bytes=64 << 20,
    )


def layered_path(records: list[RecordDict]) -> dict[str, NDArray[Any]]:
    """Decode, validate every reply and take the weighted mean, as the strategy does."""
    checks = _checks(records)
    replies = []
    for i, content in enumerate(records):
        record = content["arrays"]
        metrics = content["metrics"]
        assert isinstance(record, ArrayRecord) and isinstance(metrics, MetricRecord)
        arrays = {k: decode_npy(v.data, name=k) for k, v in record.items()}
        weight = metrics["num-examples"]
        assert isinstance(weight, int | float)
        replies.append(Reply(arrays, float(weight), f"client-{i}"))
    outcome = validate_and_aggregate(replies, Aggregator(kind="fedavg"), checks)
    assert outcome.result is not None and not outcome.refused
    return outcome.result.arrays


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(replies: int, size: int, arrays: int, repeats: int) -> dict[str, Any]:
    """Time both paths alternately; return medians, all samples and the ratio."""
    records = make_replies(replies, size, arrays)
    ours, theirs = layered_path(records), flower_path(records)
    diff = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in theirs)
    samples: dict[str, list[float]] = {"flower": [], "layered": []}
    for _ in range(repeats):
        samples["flower"].append(_time(lambda: flower_path(records)))
        samples["layered"].append(_time(lambda: layered_path(records)))
    flower_s = statistics.median(samples["flower"])
    layered_s = statistics.median(samples["layered"])
    return {
        "replies": replies,
        "floats_per_reply": size,
        "arrays_per_reply": arrays,
        "repeats": repeats,
        "flower_median_s": flower_s,
        "layered_median_s": layered_s,
        "ratio": layered_s / flower_s,
        "max_abs_diff": diff,
        "samples_s": samples,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run benchmark 1 for one and for eight arrays per reply; write and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=100)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cases = [run(args.replies, args.size, k, args.repeats) for k in (1, 8)]
    report = {
        "benchmark": "aggregation: layered validate+fedavg vs flwr aggregate_arrayrecords",
        "goal_ratio_at_most": 1.0,
        "cases": cases,
        "environment": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "flwr": flwr.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for case in cases:
        print(
            f"{case['arrays_per_reply']} array(s)/reply: flower {case['flower_median_s']:.4f}s "
            f"layered {case['layered_median_s']:.4f}s ratio {case['ratio']:.3f} "
            f"(max |diff| {case['max_abs_diff']:.2e})"
        )
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
