"""Benchmark P3: wall time per round and peak RSS against the number of instances.

For each N (default 100, 1,000, 10,000; add 100,000 with ``--sizes``) it writes a
scenario of N instances, each with its own individual slot, samples 100 per round
(creator raters included), runs the gym (:func:`layerfed.simulation.simulate` with
:class:`~layerfed.simulation.SimSettings`, i.e. :class:`GymSource` clients on
Flower's simulation engine) for R rounds (default 20) in a child process, and
samples the summed RSS of that process and all its descendants (Ray's workers
included) every 0.2 s. Rounds 2..R are timed from metrics.json (round 1 includes
Ray's worker start-up). Goal: peak RSS <= 8 GiB and the median round <= 1.2x the
100-instance median. It also reports the bytes one message carries per layer.
Writes bench/results/scale.json, scale.md and scale.png.

    .venv/bin/python bench/bench_scale.py [--sizes 100 1000 10000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import environment

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_RATIO, GOAL_RSS_GIB = 1.2, 8.0
"""Median round at most 1.2x the 100-instance median; peak RSS of the process tree <= 8 GiB."""


def scenario(n: int, rounds: int) -> str:
    """A scenario of ``n`` instances (4 creator raters), 100 sampled per round."""
    per_layer = min(24, (n - 4) // 4)
    return f"""
name: scale-{n}
seed: 0
rounds: {rounds}
populations:
  - {{count: 4, id_prefix: rater-, layers: [creator], user: {{kind: aligned, examples: 8}}}}
  - count: {n - 4}
    id_prefix: i-
    jurisdictions: [eu, us, uk, jp]
    groups: [[g1], [g2], [g3], [g1, g4]]
    styles: ["great", "thanks", "ok", "good", "yes"]
    layers: [government, community, in_group, individual]
    user: {{kind: stylist, examples: 8}}
sample_per_layer: {{creator: 4, government: {per_layer}, community: {per_layer}, in_group: {per_layer}, individual: {per_layer}}}
"""


class TreeRss(threading.Thread):
    """Samples the summed RSS of a process and its descendants; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, False

    def run(self) -> None:
        while not self.done:
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                total = 0
                for proc in procs:
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        continue
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            time.sleep(0.2)


def run_one(n: int, rounds: int, work: Path) -> dict[str, Any]:
    """One simulation of ``n`` instances; its timings and peak RSS."""
    scn = work / f"scale-{n}.yaml"
    scn.write_text(scenario(n, rounds))
    out = work / f"out-{n}"
    cmd = [sys.executable, __file__, "--child", str(scn), str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    sampler = TreeRss(proc.pid)
    sampler.start()
    _, err = proc.communicate()
    sampler.done = True
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"simulate with {n} instances failed: {err.decode()[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    walls = [r["wall_s"] for r in metrics["rounds"]]
    sampled = [sum(layer["sampled"] for layer in r["layers"].values()) for r in metrics["rounds"]]
    audit_lines = sum(1 for _ in (out / "audit.jsonl").open())
    cpu = [json.loads(line)["cpu_s"] for line in (out / "cpu.jsonl").open()]
    cpu_rounds = [b - a for a, b in itertools.pairwise(cpu)]  # rounds 2..R
    return {
        "instances": n,
        "rounds": rounds,
        "sampled_per_round": statistics.median(sampled),
        "total_s": total,
        "first_round_s": walls[0],
        "round_s_median": statistics.median(walls[1:]),
        "round_s": walls,
        "round_cpu_s_median": statistics.median(cpu_rounds) if cpu_rounds else None,
        "round_cpu_s": cpu_rounds,
        "peak_rss_gib": sampler.peak / 2**30,
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "audit_records": audit_lines,
        "instance_dirs": len(list((out / "state" / "instances").iterdir()))
        if (out / "state" / "instances").exists()
        else 0,
    }


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants so far."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def child(scenario_path: str, out: str) -> None:
    """The measured process: the gym's simulation of one scenario (no evaluator, no report).

    At each round's end it appends the CPU seconds its process tree (Ray's workers
    included) has used so far to ``<out>/cpu.jsonl``: CPU per round is far less
    sensitive than wall time to other work on a shared machine.
    """
    from layerfed.simulation.settings import SimSettings
    from layerfed.simulation.simulate import simulate

    log = Path(out) / "cpu.jsonl"

    def on_round(metrics: dict[str, Any]) -> None:
        with log.open("a") as f:
            f.write(
                json.dumps({"round": metrics["round"], "cpu_s": tree_cpu_s(os.getpid())}) + "\n"
            )

    simulate(SimSettings(scenario=scenario_path, out=out), on_round=on_round)


def message_bytes() -> dict[str, dict[str, int]]:
    """Bytes of slot arrays per layer: sent to an instance (B of a slot) and sent back."""
    from layerfed.layers.base import load_base
    from layerfed.layers.slots import SlotId, slot_spec
    from layerfed.simulation.settings import SimSettings

    policy = SimSettings().load_policy()
    model, _ = load_base(policy.base_model)
    out: dict[str, dict[str, int]] = {}
    for layer in policy.layers:
        spec = slot_spec(policy, model, SlotId(layer.name, "k"))
        size = sum(4 * a * b for a, b in spec.shapes().values())
        out[layer.name] = {
            "slot_bytes_down": size,
            "update_bytes_up": size if layer.updates_leave_instance else 0,
        }
    return out


def write(results: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    """JSON, a markdown table and a plot."""
    results = sorted(results, key=lambda r: int(r["instances"]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = next((r for r in results if r["instances"] == 100), None)
    for r in results:
        r["ratio_to_100"] = r["round_s_median"] / base["round_s_median"] if base else None
        cpu, cpu100 = r["round_cpu_s_median"], base["round_cpu_s_median"] if base else None
        r["cpu_ratio_to_100"] = cpu / cpu100 if cpu and cpu100 else None
    doc = {
        "benchmark": "scale",
        "machine": environment(),
        "goal": {"ratio_to_100": f"<= {GOAL_RATIO}", "peak_rss_gib": f"<= {GOAL_RSS_GIB}"},
        "runs": results,
        **extra,
    }
    (RESULTS / "scale.json").write_text(json.dumps(doc, indent=2))
    lines = [
        "| instances | sampled/round | round 1 (s) | median round 2..R (s) | x 100-instance median | CPU s per round (all processes) | x 100-instance CPU | total (s) | peak RSS (GiB) | audit records | load after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        ratio = f"{r['ratio_to_100']:.2f}" if r["ratio_to_100"] else "-"
        cpu = f"{r['round_cpu_s_median']:.1f}" if r["round_cpu_s_median"] else "-"
        cpu_ratio = f"{r['cpu_ratio_to_100']:.2f}" if r["cpu_ratio_to_100"] else "-"
        lines.append(
            f"| {r['instances']:,} | {r['sampled_per_round']:.0f} | {r['first_round_s']:.1f} | {r['round_s_median']:.2f} | {ratio} | {cpu} | {cpu_ratio} | {r['total_s']:.0f} | {r['peak_rss_gib']:.2f} | {r['audit_records']} | {r['load_avg_after'][0]:.1f} |"
        )
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    xs = [r["instances"] for r in results]
    a.plot(xs, [r["round_s_median"] for r in results], "o-")
    a.set(
        xscale="log",
        xlabel="instances",
        ylabel="median round time (s)",
        title="time per round (100 sampled)",
    )
    b.plot(xs, [r["peak_rss_gib"] for r in results], "o-", color="tab:red")
    b.axhline(GOAL_RSS_GIB, ls="--", color="grey")
    b.set(
        xscale="log",
        xlabel="instances",
        ylabel="peak RSS, all processes (GiB)",
        title=f"memory (limit {GOAL_RSS_GIB:.0f} GiB)",
    )
    fig.tight_layout()
    fig.savefig(RESULTS / "scale.png", dpi=110)


def main() -> None:
    """Run every size and write the results."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--child", nargs=2, metavar=("SCENARIO", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            results.append(run_one(n, args.rounds, Path(tmp)))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "round_s"}), flush=True)
    write(results, {"message_bytes": message_bytes()})
    print((RESULTS / "scale.md").read_text())


if __name__ == "__main__":
    main()
