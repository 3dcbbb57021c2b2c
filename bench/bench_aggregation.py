"""Benchmark 1: the layered aggregation path against Flower's FedAvg, side by side.

Both paths start from the same Flower replies (``RecordDict`` with one
``ArrayRecord`` and a ``num-examples`` metric). Flower's path is
``aggregate_arrayrecords``. The layered path is the round's own code: the
payload size check, :func:`layerfed.wire.protocol.arrays_from_record` (zero-copy
views), then :func:`layerfed.federation.aggregate.validate_and_aggregate`, which
validates every reply in full (names, scope, red lines, size, dtype, shape,
finiteness, float64 norm under the cap) and takes the weighted mean in one fused
pass. The layered path runs three ways: as shipped (the C kernel where it is
built, on :data:`layerfed.layers.fused.THREADS` threads), the same on one
thread, and the torch path the kernel replaced ("before"; same bits). After a
warm-up the paths run in turn (the order rotates) and the median of the repeats
is kept, wall and CPU time. Also reported: the CPU model, the load, the memory
bandwidth (a numpy copy of 400 MB) and the floor it sets: every reply's bytes
must be read from memory once (4 bytes per float, plus the float64 sum and the
result), by either path, so each path's time is given over that floor.

    .venv/bin/python bench/bench_aggregation.py [--replies 100] [--size 1000000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
"""Per float32 and reply if nothing stayed in cache: np.load copy (4 read + 4 write),
``value * w`` (4 + 4), ``+=`` (8 + 4). An upper estimate: one array's copy and temporary
(4 MB) stay in cache, so Flower too is bound by the 4 bytes per float it must read."""


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


@contextmanager
def _variant(name: str) -> Iterator[None]:
    """The layered path as shipped, on one thread, or on the torch path (the kernel off)."""
    saved_threads, saved_kernel = fused.THREADS, fused._kernel[:]
    try:
        if name == "layered_1_thread":
            fused.THREADS = 1
        elif name == "layered_torch":
            fused._kernel[:] = [None]
        yield
    finally:
        fused.THREADS = saved_threads
        fused._kernel[:] = saved_kernel


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


PATHS = ("flower", "layered", "layered_1_thread", "layered_torch")
"""What each case times: Flower, ours as shipped, ours on one thread, ours before the C kernel."""


def _paths() -> tuple[str, ...]:
    """The paths to time (the two kernel rows only where the C kernel runs)."""
    return PATHS if fused.kernel() is not None else ("flower", "layered")


def run(replies: int, size: int, arrays: int, repeats: int, bw: float) -> dict[str, Any]:
    """Time every path in turn; return medians (wall, CPU), samples, ratios and the floor."""
    records = make_replies(replies, size, arrays)
    ours, theirs, exact = layered_path(records), flower_path(records), _exact(records)
    with _variant("layered_torch"):
        before = layered_path(records)
    diff = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in theirs)
    exact_diff = max(float(np.max(np.abs(ours[k] - exact[k]))) for k in exact)
    same_bits = all(np.array_equal(ours[k], before[k]) for k in ours)
    names = _paths()
    funcs = {"flower": flower_path}
    samples: dict[str, list[float]] = {n: [] for n in names}
    cpu_samples: dict[str, list[float]] = {n: [] for n in names}
    load = [os.getloadavg()[0]]
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            path = funcs.get(name, layered_path)
            with _variant(name):
                cpu = time.process_time()
                samples[name].append(_time(lambda: path(records)))  # noqa: B023 (called at once)
                cpu_samples[name].append(time.process_time() - cpu)
    load.append(os.getloadavg()[0])
    wall = {n: statistics.median(v) for n, v in samples.items()}
    cpu_s = {n: statistics.median(v) for n, v in cpu_samples.items()}
    floats = replies * (size // arrays) * arrays
    floor_bytes = 4 * floats + (8 + 4) * size  # each reply read once; float64 sum; result
    floor = floor_bytes / bw
    return {
        "replies": replies,
        "floats_per_reply": size,
        "arrays_per_reply": arrays,
        "repeats": repeats,
        "flower_median_s": wall["flower"],
        "layered_median_s": wall["layered"],
        "ratio": wall["layered"] / wall["flower"],
        "cpu_ratio": cpu_s["layered"] / cpu_s["flower"],
        "median_s": wall,
        "cpu_median_s": cpu_s,
        "ratio_to_flower": {n: wall[n] / wall["flower"] for n in names},
        "cpu_ratio_to_flower": {n: cpu_s[n] / cpu_s["flower"] for n in names},
        "max_abs_diff": diff,
        "max_abs_diff_vs_float64_mean": exact_diff,
        "same_bits_as_torch_path": same_bits,
        "floor_bytes": floor_bytes,
        "floor_s": floor,
        "times_floor": {n: wall[n] / floor for n in names},
        "flower_bytes_if_uncached": FLOWER_BYTES_PER_FLOAT * floats,
        "flower_cpu_median_s": cpu_s["flower"],
        "layered_cpu_median_s": cpu_s["layered"],
        "load_average_1min_before_after": load,
        "samples_s": samples,
        "cpu_samples_s": cpu_samples,
    }


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in ``/proc/cpuinfo`` (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _cpu_model() -> str:
    """Model name, family/model/stepping (a VM may show only "AMD EPYC"), and the SIMD level."""
    info = _cpuinfo()
    if not info:
        return platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    simd = next((f for f in ("avx512f", "avx2", "sse4_2") if f in flags), "baseline")
    return (
        f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model "
        f"{info.get('model', '?')} stepping {info.get('stepping', '?')}, {simd})"
    )


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
        "c_kernel": fused.kernel() is not None,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "memory_bandwidth_gb_s": bw / 1e9,
        "load_average": os.getloadavg(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": _commit(),
    }


HISTORY = 8
"""Earlier runs kept (summaries) in the results file, newest first: other CPUs, the code before."""


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """One run in brief: where, when, which code, and per case the medians and ratios."""
    env = report.get("environment", {})
    cases = []
    for case in report.get("cases", []):
        brief = {k: case.get(k) for k in ("arrays_per_reply", "ratio", "cpu_ratio")}
        brief["median_s"] = case.get("median_s") or {
            "flower": case.get("flower_median_s"),
            "layered": case.get("layered_median_s"),
        }
        brief["cpu_median_s"] = case.get("cpu_median_s") or {
            "flower": case.get("flower_cpu_median_s"),
            "layered": case.get("layered_cpu_median_s"),
        }
        brief["times_floor"] = case.get("times_floor")
        cases.append(brief)
    keep = ("cpu", "cpus", "aggregation_threads", "c_kernel", "load_average", "when", "commit")
    return {"environment": {k: env.get(k) for k in keep}, "cases": cases}


def _earlier(out: Path) -> list[dict[str, Any]]:
    """The summaries already in ``out`` plus its last full run, newest first (at most HISTORY)."""
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict):
        return []
    earlier = old.get("earlier_runs", [])
    return [summary(old), *(earlier if isinstance(earlier, list) else [])][:HISTORY]


def _commit() -> str | None:
    """The repository's HEAD commit (short), or None outside a git checkout."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


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
        "earlier_runs": _earlier(args.out),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{env['cpu']}, {env['cpus']} cpus, {env['aggregation_threads']} aggregation threads, "
        f"bandwidth {env['memory_bandwidth_gb_s']:.1f} GB/s, load {env['load_average'][0]:.2f}"
    )
    for case in cases:
        rows = ", ".join(
            f"{n} {case['median_s'][n]:.4f}s/{case['cpu_median_s'][n]:.4f}s CPU "
            f"({case['ratio_to_flower'][n]:.2f}x, CPU {case['cpu_ratio_to_flower'][n]:.2f}x, "
            f"{case['times_floor'][n]:.1f}x floor)"
            for n in case["median_s"]
        )
        print(
            f"{case['arrays_per_reply']} array(s)/reply: {rows}; goal layered <= {GOAL}x; "
            f"floor {case['floor_s']:.4f}s; max |diff| vs flower {case['max_abs_diff']:.1e}, "
            f"vs float64 mean {case['max_abs_diff_vs_float64_mean']:.1e}; same bits as the "
            f"torch path: {case['same_bits_as_torch_path']}; load "
            f"{case['load_average_1min_before_after']}"
        )
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
