"""Benchmark P6: the composition-aware red-line gate's share of a round at 100 compositions.

A server round of the default policy on its tiny model, through the real round path
(:func:`~layerfed.federation.pipeline.process_replies`: decode, verify signatures,
validate, aggregate, vetoes, the red-line gate, commit, audit). Known instances have
100 distinct ``(jurisdiction, group)`` profiles (10 jurisdictions x 10 groups), and
every government and in-group slot already holds non-zero committed arrays, so the
100 compositions are 100 different models. Each round ``--clients`` signed replies
update the creator slot, which every composition contains: the gate measures the red
line on all 100. Rounds 2.. run on the state the earlier rounds committed (steady
state: the committed compositions were measured as the previous round's candidates).

Reported per round: the whole round's wall time, the gate's (the time spent inside
:func:`~layerfed.federation.redline_gate.redline_breach`), its share, the probe
forward passes the gate ran, and the CPU model. Goal: gate <= 10% of the round.

    .venv/bin/python bench/bench_redline_gate.py [--rounds 4] [--clients 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _machine import environment  # noqa: E402
from round_helpers import CREATOR, RUN, Harness  # noqa: E402

import layerfed.federation.stages.judge as judge_stage  # noqa: E402
from layerfed.federation import redline_gate  # noqa: E402
from layerfed.federation.pipeline import RoundContext, process_replies  # noqa: E402
from layerfed.federation.probes import ProbeRunner  # noqa: E402
from layerfed.layers import probes as layer_probes  # noqa: E402
from layerfed.layers.probe_batch import BatchedProbes  # noqa: E402
from layerfed.layers.slots import SlotId  # noqa: E402

RESULTS = HERE / "results" / "redline_gate.json"
GOAL = 0.10
"""Most share of a round the red-line gate may take (goal P6)."""
JURISDICTIONS = [f"j{i}" for i in range(10)]
GROUPS = [f"g{i}" for i in range(10)]


class _Timed:
    """Wraps the gate and the probe forward passes, accumulating time and calls."""

    def __init__(self) -> None:
        self.gate_s = 0.0
        self.gate_cpu_s = 0.0
        self.forwards = 0
        self.gate = redline_gate.redline_breach
        self.forward = BatchedProbes._forward
        self.margins = layer_probes.suite_margins

    def install(self) -> None:
        def gate(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return self.gate(*args, **kwargs)
            finally:
                self.gate_s += time.perf_counter() - start
                self.gate_cpu_s += time.process_time() - cpu

        def forward(*args: Any, **kwargs: Any) -> Any:
            self.forwards += 1
            return self.forward(*args, **kwargs)

        def margins(*args: Any, **kwargs: Any) -> Any:
            self.forwards += 1
            return self.margins(*args, **kwargs)

        setattr(judge_stage, "redline_breach", gate)  # noqa: B010 (the judge stage's own name)
        import layerfed.federation.probes as fed_probes

        setattr(BatchedProbes, "_forward", forward)  # noqa: B010 (counting the passes)
        setattr(fed_probes, "suite_margins", margins)  # noqa: B010 (one at a time)


def _seed_slots(h: Harness) -> None:
    """Non-zero committed arrays for every jurisdiction and group slot (round 0)."""
    slots = [SlotId("government", j) for j in JURISDICTIONS]
    slots += [SlotId("in_group", g) for g in GROUPS]
    for i, slot in enumerate(slots):
        rng = np.random.default_rng([7, i])
        shapes = h.stack.spec(slot).shapes()
        arrays = {n: rng.normal(0.0, 0.02, s).astype(np.float32) for n, s in shapes.items()}
        h.state.commit(slot, arrays, h.stack.spec(slot), 0)


def _round(h: Harness, runner: ProbeRunner, clients: int, round_: int) -> tuple[float, float]:
    """One timed round: ``clients`` signed creator replies through process_replies."""
    h.round = round_
    h.pending.clear()
    h.identities.clear()
    replies = []
    for node in range(1, clients + 1):
        h.task(node, CREATOR)
    for node in range(1, clients + 1):
        replies.append(h.reply(node, h.arrays(CREATOR, scale=1e-3, seed=100 * round_ + node)))
    profiles = frozenset((j, (g,)) for j in JURISDICTIONS for g in GROUPS)
    ctx = RoundContext(
        policy=h.policy,
        run_id=RUN,
        round=round_,
        state=h.state,
        stack=h.stack,
        tokenizer=h.tokenizer,
        audit=h.audit,
        identities=h.identities,
        pending=h.pending,
        probes=runner,
        profiles=profiles,
    )
    start, cpu = time.perf_counter(), time.process_time()
    report = process_replies(ctx, replies)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert str(CREATOR) in report.committed, report.metrics
    return wall, cpu


def main() -> None:
    """Run the rounds, print and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        h = Harness(Path(tmp), round_=1)
        _seed_slots(h)
        runner = ProbeRunner(h.policy, h.stack, h.tokenizer)
        runner.suite("red_line_refusals")  # suites load once per server, not per round
        timed = _Timed()
        timed.install()
        rows = []
        for r in range(1, args.rounds + 1):
            timed.gate_s, timed.gate_cpu_s, timed.forwards = 0.0, 0.0, 0
            rescored = runner.rescored
            wall, cpu = _round(h, runner, args.clients, r)
            rows.append(
                {
                    "round": r,
                    "round_s": wall,
                    "gate_s": timed.gate_s,
                    "rest_s": wall - timed.gate_s,
                    "share": timed.gate_s / wall,
                    "round_cpu_s": cpu,
                    "gate_cpu_s": timed.gate_cpu_s,
                    "rest_cpu_s": cpu - timed.gate_cpu_s,
                    "share_cpu": timed.gate_cpu_s / cpu,
                    "probe_forward_passes": timed.forwards,
                    "compositions_rescored": runner.rescored - rescored,
                    "load_avg": environment()["load_avg"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    steady = rows[1:] or rows
    share = statistics.median(r["share"] for r in steady)
    doc = {
        "benchmark": "P6 red-line gate at 100 compositions",
        "compositions": len(JURISDICTIONS) * len(GROUPS),
        "clients_per_round": args.clients,
        "rounds": rows,
        "median_share_steady": share,
        "median_gate_s_steady": statistics.median(r["gate_s"] for r in steady),
        "median_round_s_steady": statistics.median(r["round_s"] for r in steady),
        "median_share_cpu_steady": statistics.median(r["share_cpu"] for r in steady),
        "median_gate_cpu_s_steady": statistics.median(r["gate_cpu_s"] for r in steady),
        "median_rest_cpu_s_steady": statistics.median(r["rest_cpu_s"] for r in steady),
        "first_round_share": rows[0]["share"],
        "goal": f"<= {GOAL:.0%}",
        "met": share <= GOAL,
        "machine": environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: v for k, v in doc.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
