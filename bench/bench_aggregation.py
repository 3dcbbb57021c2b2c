"""Benchmark 1: the layered aggregation path against Flower's FedAvg, side by side.

Both paths start from the same Flower replies (``RecordDict`` with one
``ArrayRecord`` and a ``num-examples`` metric). Flower's path is
``aggregate_arrayrecords``. The layered path is the round's own code: the
payload size check, :func:`layerfed.wire.protocol.arrays_from_record` (zero-copy
views), then :func:`layerfed.federation.aggregate.validate_and_aggregate`, which
validates every reply in full (names, scope, red lines, size, dtype, shape,
finiteness, float64 norm under the cap) and takes the weighted mean in one fused
pass. After a warm-up the two run alternately (which goes first alternates too)
and the median of the repeats is kept. Also reported: the memory bandwidth (a
numpy copy of 400 MB) and the time floor it sets, the bytes each path must move
divided by that bandwidth, so that a miss can be explained.

    .venv/bin/python bench/bench_aggregation.py [--replies 100] [--size 1000000] [--repeats 7]
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
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from numpy.typing import NDArray

from layerfed.federation.aggregate import Reply, validate_and_aggregate
from layerfed.federation.validate import ReplyChecks
from layerfed.governance.patterns import matches_any
from layerfed.governance.schema import Aggregator
from layerfed.layers import fused
from layerfed.wire.protocol import UPDATE, arrays_from_record

__all__ = ["bandwidth", "environment", "flower_path", "layered_path", "main", "make_replies", "run"]

RESULTS = Path(__file__).resolve().parent / "results" / "aggregation.json"
SCOPE = ["base_model.model.transformer.h.*.mlp.*.lora_*.weight"]
RED_LINES = ["**.wte.*", "**.ln_*.*", "lm_head.*"]
GOAL = 0.8
"""Most layered / Flower time allowed (goal P1)."""
FLOWER_BYTES_PER_FLOAT = 28
"""Per float32 and reply: np.load copy (4 read + 4 write), ``value * w`` (4 + 4), ``+=`` (8 + 4)."""


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
    """Decode, validate every reply and take the weighted mean, as the round does."""
    checks = _checks(records)
    assert checks.max_bytes is not None
    replies = []
    for i, content in enumerate(records):
        record = content["arrays"]
        metrics = content["metrics"]
        assert isinstance(record, ArrayRecord) and isinstance(metrics, MetricRecord)
        assert sum(len(array.data) for array in record.values()) <= checks.max_bytes
        arrays = arrays_from_record(record, where=UPDATE)
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


def _exact(records: list[RecordDict]) -> dict[str, NDArray[np.float64]]:
    """The plain weighted mean in float64, densely, as the reference."""
    total: dict[str, NDArray[np.float64]] = {}
    weight = 0.0
    for content in records:
        record, metrics = content["arrays"], content["metrics"]
        assert isinstance(record, ArrayRecord) and isinstance(metrics, MetricRecord)
        w = metrics["num-examples"]
        assert isinstance(w, int | float)
        weight += w
        for k, v in record.items():
            part = w * v.numpy().astype(np.float64)
            total[k] = total[k] + part if k in total else part
    return {k: v / weight for k, v in total.items()}


def bandwidth(megabytes: int = 400, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s: best of ``repeats`` numpy copies (read + write) of 400 MB."""
    src = np.ones(megabytes * (1 << 20) // 8)
    dst = np.empty_like(src)
    best = min(_time(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best


def run(replies: int, size: int, arrays: int, repeats: int, bw: float) -> dict[str, Any]:
    """Time both paths alternately; return medians, all samples, the ratio and the floors."""
    records = make_replies(replies, size, arrays)
    ours, theirs, exact = layered_path(records), flower_path(records), _exact(records)
    diff = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in theirs)
    exact_diff = max(float(np.max(np.abs(ours[k] - exact[k]))) for k in exact)
    samples: dict[str, list[float]] = {"flower": [], "layered": []}
    cpu_samples: dict[str, list[float]] = {"flower": [], "layered": []}
    paths = {"flower": flower_path, "layered": layered_path}
    for i in range(repeats):
        for name in ("flower", "layered") if i % 2 == 0 else ("layered", "flower"):
            path = paths[name]
            cpu = time.process_time()
            samples[name].append(_time(lambda: path(records)))  # noqa: B023 (called at once)
            cpu_samples[name].append(time.process_time() - cpu)
    flower_s = statistics.median(samples["flower"])
    layered_s = statistics.median(samples["layered"])
    floats = replies * (size // arrays) * arrays
    layered_bytes = 4 * floats + (8 + 4) * size  # each reply read once; float64 sum; result
    flower_bytes = FLOWER_BYTES_PER_FLOAT * floats
    return {
        "replies": replies,
        "floats_per_reply": size,
        "arrays_per_reply": arrays,
        "repeats": repeats,
        "flower_median_s": flower_s,
        "layered_median_s": layered_s,
        "ratio": layered_s / flower_s,
        "max_abs_diff": diff,
        "max_abs_diff_vs_float64_mean": exact_diff,
        "layered_bytes_moved": layered_bytes,
        "flower_bytes_moved": flower_bytes,
        "layered_floor_s": layered_bytes / bw,
        "flower_floor_s": flower_bytes / bw,
        "layered_share_of_floor": (layered_bytes / bw) / layered_s,
        "flower_cpu_median_s": statistics.median(cpu_samples["flower"]),
        "layered_cpu_median_s": statistics.median(cpu_samples["layered"]),
        "samples_s": samples,
        "cpu_samples_s": cpu_samples,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(bw: float) -> dict[str, Any]:
    """Where the numbers were taken: CPU, threads, library versions, bandwidth, load."""
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "aggregation_threads": fused.THREADS,
        "torch_threads": torch.get_num_threads(),
        "memory_bandwidth_gb_s": bw / 1e9,
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run benchmark 1 for one and for eight arrays per reply; write and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=100)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    bw = bandwidth()
    cases = [run(args.replies, args.size, k, args.repeats, bw) for k in (1, 8)]
    env = environment(bw)
    report = {
        "benchmark": "aggregation: layered decode+validate+fedavg vs flwr aggregate_arrayrecords",
        "goal_ratio_at_most": GOAL,
        "cases": cases,
        "environment": env,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{env['cpu']}, {env['cpus']} cpus, {env['aggregation_threads']} aggregation threads, "
        f"bandwidth {env['memory_bandwidth_gb_s']:.1f} GB/s, load {env['load_average'][0]:.2f}"
    )
    for case in cases:
        print(
            f"{case['arrays_per_reply']} array(s)/reply: flower {case['flower_median_s']:.4f}s "
            f"layered {case['layered_median_s']:.4f}s ratio {case['ratio']:.3f} (goal <= {GOAL}); "
            f"CPU time flower {case['flower_cpu_median_s']:.4f}s layered "
            f"{case['layered_cpu_median_s']:.4f}s; "
            f"max |diff| vs flower {case['max_abs_diff']:.1e}, vs float64 mean "
            f"{case['max_abs_diff_vs_float64_mean']:.1e}; floors: layered "
            f"{case['layered_floor_s']:.4f}s flower {case['flower_floor_s']:.4f}s"
        )
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
