"""Benchmark: a secure-aggregation round against a plain round with the same clients.

Gym simulations one after the other on the same machine: 12 instances in
one group, 10 sampled per round for the ``in_group`` layer (one slot, so 10
clients per slot), the default policy made fit for secure aggregation (FedAvg,
no per-reply norm checks). The plain run leaves ``privacy`` unset; the secure
run sets ``mode: secure_aggregation`` (threshold 0.6, 16-bit quantisation).
Both train the same examples with the same seeds. The runs go in ABBA order
(plain, secure, secure, plain; ``--repeats`` blocks) so that load drift on a
shared machine hits both arms alike; ratios are of medians over all timed
rounds. Round time is the time between successive round ends (first round, Ray
warm-up, dropped), CPU time the user + system seconds of the process tree (the
server and Ray's actors) over the same span, with the load average beside; bytes are
the content of every message the server sends and receives (array bytes plus
config values: bytes and strings by length, numbers 8 bytes each), per round.

    .venv/bin/python bench/bench_secagg.py [--rounds 5] [--repeats 1] [--label what]

An existing result file is kept under ``earlier_runs`` (newest first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import environment

from layerfed.simulation.runner import SettingsGrid
from layerfed.simulation.server import run_gym_server
from layerfed.simulation.settings import DEFAULT_POLICY, SimSettings
from layerfed.simulation.simulate import simulate

RESULTS = Path(__file__).resolve().parent / "results" / "secagg.json"
SCENARIO = """
name: bench-secagg
seed: 0
rounds: 8
populations:
  - {count: 12, id_prefix: g-, jurisdictions: [eu], groups: [[g1]], layers: [in_group],
     user: {kind: stylist, examples: 8}}
sample_per_layer: {in_group: 10}
"""


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's content: arrays by their data, config values by length (numbers: 8)."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(a.data) for a in record.values())
    for record in [*content.config_records.values(), *content.metric_records.values()]:
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in items)
    return total


class Counter(SettingsGrid):
    """The gym's grid, adding up the bytes of everything sent and received."""

    sent: int = 0
    received: int = 0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        out = list(messages)
        self.sent += sum(content_bytes(m.content) for m in out)
        replies = list(super().send_and_receive(out, timeout=timeout))
        self.received += sum(content_bytes(m.content) for m in replies if not m.has_error())
        return replies


def _policy(folder: Path, secure: bool) -> Path:
    data: dict[str, Any] = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    group = next(layer for layer in data["layers"] if layer["name"] == "in_group")
    group.update(aggregator={"kind": "fedavg"}, min_clients=3)
    group.pop("norm_cap", None)
    if secure:
        group["privacy"] = {"mode": "secure_aggregation", "clip_norm": 2.0}
    for veto in data["vetoes"]:
        if veto["name"] == "government_norm":
            veto["action"] = "reject"
    path = folder / ("secure.yaml" if secure else "plain.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _one(folder: Path, secure: bool, rounds: int) -> dict[str, Any]:
    (folder / "scenario.yaml").write_text(SCENARIO, encoding="utf-8")
    settings = SimSettings(
        policy=str(_policy(folder, secure)),
        scenario=str(folder / "scenario.yaml"),
        out=str(folder / ("secure" if secure else "plain")),
        rounds=rounds,
        verify=False,
        run_id="secure" if secure else "plain",
    )
    marks: list[float] = []
    cpu: list[float] = []
    per_round: list[int] = []
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        counter = Counter(grid, settings.resolved())

        def on_round(metrics: dict[str, Any]) -> None:
            marks.append(time.perf_counter())
            cpu.append(_tree_cpu())
            per_round.append(counter.sent + counter.received - sum(per_round))

        run_gym_server(counter, context, settings, on_round)

    simulate(settings, server_app=app)
    times = np.diff(marks).tolist()
    cpu_s = np.diff(cpu).tolist()
    return {
        "round_s": times,
        "median_s": statistics.median(times),
        "cpu_s": cpu_s,
        "median_cpu_s": statistics.median(cpu_s),
        "bytes": per_round[1:],
    }


def _tree_cpu() -> float:
    """CPU seconds (user + system) of this process and every live descendant (Ray's actors)."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's timed rounds over its runs: medians of wall time, CPU time and bytes."""
    times = [t for r in runs for t in r["round_s"]]
    cpu = [c for r in runs for c in r["cpu_s"]]
    sizes = [b for r in runs for b in r["bytes"]]
    return {
        "runs": runs,
        "median_s": statistics.median(times),
        "median_cpu_s": statistics.median(cpu),
        "median_bytes": statistics.median(sizes),
    }


def run(rounds: int, repeats: int) -> dict[str, Any]:
    """Plain and secure runs in ABBA order (load drift hits both arms alike); median ratios."""
    before = environment()
    order = [False, True, True, False] * repeats
    arms: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for k, secure in enumerate(order):
            folder = Path(tmp) / str(k)
            folder.mkdir()
            arms[secure].append(_one(folder, secure, rounds) | {"load_avg": os.getloadavg()[0]})
    plain, secure = _merged(arms[False]), _merged(arms[True])
    machine = environment()
    machine["load_avg_before"] = before["load_avg"]
    machine["load_avg_after"] = machine.pop("load_avg")
    return {
        "benchmark": "secure_aggregation_round_vs_plain_round",
        "machine": machine,
        "rounds": rounds,
        "order": ["secure" if s else "plain" for s in order],
        "clients_per_slot": 10,
        "plain": plain,
        "secure": secure,
        "time_ratio": secure["median_s"] / plain["median_s"],
        "cpu_ratio": secure["median_cpu_s"] / plain["median_cpu_s"],
        "bytes_ratio": secure["median_bytes"] / plain["median_bytes"],
        "goal": "time_ratio <= 1.5, bytes_ratio <= 3",
    }


def main() -> None:
    """Run and write the JSON result."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="ABBA blocks (4 runs each)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--label", default="", help="what this run measures (kept in the file)")
    args = parser.parse_args()
    result = run(args.rounds, args.repeats) | {"label": args.label}
    earlier: list[dict[str, Any]] = []
    if args.out.exists():  # keep the earlier results beside the new one, newest first
        old = json.loads(args.out.read_text(encoding="utf-8"))
        earlier = [{k: v for k, v in old.items() if k != "earlier_runs"}]
        earlier += old.get("earlier_runs", [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result | {"earlier_runs": earlier}, indent=2), encoding="utf-8")
    keys = ("time_ratio", "cpu_ratio", "bytes_ratio")
    print(json.dumps({k: result[k] for k in keys} | {"machine": result["machine"]}, indent=2))


if __name__ == "__main__":
    main()
