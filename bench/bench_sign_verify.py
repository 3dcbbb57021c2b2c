"""Benchmark: sign + verify of 1M-float32 updates against one round's FedAvg aggregation.

Run ``.venv/bin/python bench/bench_sign_verify.py``; prints JSON and writes it to
``bench/results/sign_verify.json``. Signing and verification include the array
digest (SHA-256 over 4 MB). Aggregation is Flower's own
``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`` over ``--replies``
replies of the same size, timed in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cryptography
import numpy as np
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import environment

from layerfed.governance.envelope import UpdateEnvelope, arrays_digest, sign_update, verify_update
from layerfed.governance.keys import public_key_string
from layerfed.governance.schema import Policy

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "sign_verify.json"


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def verify_round_parallel(
    envelope: UpdateEnvelope, arrays: dict[str, Any], policy: Policy, replies: int, workers: int
) -> None:
    """Verify ``replies`` updates on a thread pool (SHA-256 releases the GIL)."""
    with ThreadPoolExecutor(workers) as pool:
        futures = [
            pool.submit(verify_update, envelope, arrays, policy, run_id="bench", round=1)
            for _ in range(replies)
        ]
        for future in futures:
            future.result()


def bench_policy(key: Ed25519PrivateKey) -> Policy:
    """The default policy with a government principal for ``key``."""
    data: dict[str, Any] = yaml.safe_load((ROOT / "examples/policies/default.yaml").read_text())
    data["principals"] = [
        {"name": "gov_eu", "layer": "government", "public_key": public_key_string(key.public_key())}
    ]
    return Policy.model_validate(data)


def run(size: int, replies: int, repeats: int) -> dict[str, Any]:
    """Time digest, sign, verify and aggregation; return the report."""
    rng = np.random.default_rng(0)
    arrays = {"update": rng.standard_normal(size, dtype=np.float32)}
    key = Ed25519PrivateKey.generate()
    policy = bench_policy(key)

    def sign() -> UpdateEnvelope:
        return sign_update(
            arrays,
            run_id="bench",
            round=1,
            layer="government",
            slot_key="eu",
            instance_id="i0",
            num_examples=10,
            principal_name="gov_eu",
            private_key=key,
        )

    envelope = sign()
    digest_s = median_seconds(lambda: arrays_digest(arrays), repeats)
    sign_s = median_seconds(sign, repeats)
    verify_s = median_seconds(
        lambda: verify_update(envelope, arrays, policy, run_id="bench", round=1), repeats
    )
    records = [
        RecordDict(
            {
                "arrays": ArrayRecord(
                    {"update": Array(rng.standard_normal(size, dtype=np.float32))}
                ),
                "metrics": MetricRecord({"num-examples": 10 + i}),
            }
        )
        for i in range(replies)
    ]
    aggregate_s = median_seconds(
        lambda: aggregate_arrayrecords(records, "num-examples"), max(3, repeats // 5)
    )
    workers = os.cpu_count() or 1
    parallel_s = median_seconds(
        lambda: verify_round_parallel(envelope, arrays, policy, replies, workers),
        max(3, repeats // 5),
    )
    mb = size * 4 / 1e6
    return {
        "update_floats": size,
        "update_megabytes": mb,
        "replies_per_round": replies,
        "digest_ms": digest_s * 1e3,
        "sign_ms": sign_s * 1e3,
        "verify_ms": verify_s * 1e3,
        "sign_verify_updates_per_s": 1 / (sign_s + verify_s),
        "verify_updates_per_s": 1 / verify_s,
        "verify_megabytes_per_s": mb / verify_s,
        "aggregate_round_s": aggregate_s,
        "server_verify_round_s": verify_s * replies,
        "server_verify_share_of_aggregation": verify_s * replies / aggregate_s,
        "server_verify_share_of_round": verify_s * replies / (aggregate_s + verify_s * replies),
        "server_verify_round_parallel_s": parallel_s,
        "parallel_workers": workers,
        "server_verify_parallel_share_of_aggregation": parallel_s / aggregate_s,
        "machine": {
            **environment(),
            "platform": platform.platform(),
            "numpy": np.__version__,
            "cryptography": cryptography.__version__,
        },
    }


def main() -> None:
    """Parse arguments, run, print and save the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1_000_000, help="float32 values per update")
    parser.add_argument("--replies", type=int, default=100, help="replies aggregated per round")
    parser.add_argument("--repeats", type=int, default=20, help="timing repeats (median)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    report = run(args.size, args.replies, args.repeats)
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
