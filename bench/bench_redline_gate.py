"""Benchmark P6: all red-line work's share of a server round, gate and projection apart.

A server round of the default policy on its tiny model, through the real round path
(:func:`~layerfed.federation.pipeline.process_replies`: decode, verify signatures,
validate, aggregate, vetoes, the red-line gate, commit, audit). Known instances have
``--compositions`` distinct ``(jurisdiction, group)`` profiles (10 jurisdictions x 1
or 10 groups), and every government and in-group slot already holds non-zero
committed arrays, so the compositions are different models. Each round
``--clients`` signed replies update the creator slot, which every composition
contains. Rounds 2.. run on the state the earlier rounds committed (steady state).

Arms: the red-line suite protected by ``gate`` (the default: every composition
scored), by ``projection`` with the ``exact`` basis (the gate skips the suite:
its sequences are provably unchanged on every composition) and by ``projection``
with a top-k basis (``energy: 0.99``: bounded, not exact, so the gate still runs).

Reported per round: the round's wall and CPU time, the gate's (inside
:func:`~layerfed.federation.redline_gate.redline_breach`), the projection's (inside
:meth:`~layerfed.layers.protect.Protection.project`, where a slot's A is drawn) and
their sum's share, and apart the round metrics' per-composition red-line rates (a
report, not a check; where the tree has it); once per arm: the basis build and one slot's A draw (what
projection costs, paid once per slot). Goal: all red-line work <= 10% of the round
at 100 compositions, projection's per-round cost independent of the compositions.

    .venv/bin/python bench/bench_redline_gate.py [--rounds 3] [--clients 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
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
from round_helpers import CREATOR, RUN, SEED, Harness, policy  # noqa: E402

import layerfed.federation.round_metrics as round_metrics  # noqa: E402
import layerfed.federation.stages.judge as judge_stage  # noqa: E402
from layerfed.federation import redline_gate  # noqa: E402
from layerfed.federation.pipeline import RoundContext, process_replies  # noqa: E402
from layerfed.federation.probes import ProbeRunner  # noqa: E402
from layerfed.federation.server_state import ServerState  # noqa: E402
from layerfed.governance.schema import Policy  # noqa: E402
from layerfed.layers import protect  # noqa: E402
from layerfed.layers.base import load_base  # noqa: E402
from layerfed.layers.slots import SlotId  # noqa: E402
from layerfed.layers.stack import LayerStack  # noqa: E402

RESULTS = HERE / "results" / "redline_gate.json"
GOAL = 0.10
"""Most share of a round all red-line work may take (goal P6)."""
SUITE = "red_line_refusals"
ARMS: dict[str, dict[str, Any]] = {
    "gate": {"protect": "gate"},
    "projection_exact": {"protect": "projection", "basis": "exact"},
    "projection_top_k": {"protect": "projection", "basis": {"energy": 0.99}},
}
BEFORE = {
    "commit": "8bb7ebb",
    "what": "the gate alone (protect: gate), 100 compositions, bench/run on a quiet machine",
    "median_gate_s_steady": 0.678,
    "median_round_s_steady": 0.758,
    "median_share_steady": 0.895,
    "median_share_cpu_steady": 0.900,
    "machine": {"cpu": "Intel(R) Xeon(R) Processor @ 2.80GHz", "cpus": 2, "load_avg": [1.71]},
}
"""The numbers issue #23 quotes (bench/results/redline_gate.json at 8bb7ebb)."""


class _Timed:
    """Wraps the gate, the projection and the round's red-line report (where the round
    metrics measure every composition's rate), accumulating wall and CPU time and calls."""

    def __init__(self) -> None:
        self.reset()
        self.gate = redline_gate.redline_breach
        self.project = protect.Protection.project
        self.report = getattr(round_metrics, "red_line_rates", None)

    def reset(self) -> None:
        self.gate_s = self.gate_cpu_s = self.project_s = self.project_cpu_s = 0.0
        self.report_s = self.report_cpu_s = 0.0
        self.project_calls = 0

    def install(self) -> None:
        def gate(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return self.gate(*args, **kwargs)
            finally:
                self.gate_s += time.perf_counter() - start
                self.gate_cpu_s += time.process_time() - cpu

        def project(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return self.project(*args, **kwargs)
            finally:
                self.project_calls += 1
                self.project_s += time.perf_counter() - start
                self.project_cpu_s += time.process_time() - cpu

        def report(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                assert self.report is not None
                return self.report(*args, **kwargs)
            finally:
                self.report_s += time.perf_counter() - start
                self.report_cpu_s += time.process_time() - cpu

        setattr(judge_stage, "redline_breach", gate)  # noqa: B010 (the judge stage's own name)
        setattr(protect.Protection, "project", project)  # noqa: B010 (timing the draws)
        if self.report is not None:  # the round metrics' per-composition red-line rates
            setattr(round_metrics, "red_line_rates", report)  # noqa: B010


def _armed(base: Policy, arm: dict[str, Any]) -> Policy:
    """``base`` with its red-line suite protected as ``arm`` says."""
    data = base.model_dump(mode="json", exclude_none=True)
    data["red_lines"]["probes"] = [{"suite": SUITE, "max_violation_rate": 0.01, **arm}]
    armed = Policy.model_validate(data)
    return armed if base.source_dir is None else armed.with_source_dir(base.source_dir)


def _harness(root: Path, policy: Policy) -> Harness:
    """The round harness on ``policy`` (its own stack, so A is drawn as the arm says)."""
    h = Harness(root, round_=1)
    model, h.tokenizer = load_base(policy.base_model)
    h.policy = policy
    h.stack = LayerStack(policy, model, h.tokenizer, root_seed=SEED)
    h.state = ServerState(root, policy, RUN)
    return h


def _seed_slots(h: Harness, jurisdictions: list[str], groups: list[str]) -> None:
    """Non-zero committed arrays for every jurisdiction and group slot (round 0)."""
    slots = [SlotId("government", j) for j in jurisdictions]
    slots += [SlotId("in_group", g) for g in groups]
    for i, slot in enumerate(slots):
        rng = np.random.default_rng([7, i])
        shapes = h.stack.spec(slot).shapes()
        arrays = {n: rng.normal(0.0, 0.02, s).astype(np.float32) for n, s in shapes.items()}
        h.state.commit(slot, arrays, h.stack.spec(slot), 0)


def _round(
    h: Harness, runner: ProbeRunner, clients: int, round_: int, profiles: frozenset[Any]
) -> tuple[float, float]:
    """One timed round: ``clients`` signed creator replies through process_replies."""
    h.round = round_
    h.pending.clear()
    h.identities.clear()
    for node in range(1, clients + 1):
        h.task(node, CREATOR)
    replies = [
        h.reply(node, h.arrays(CREATOR, scale=1e-3, seed=100 * round_ + node))
        for node in range(1, clients + 1)
    ]
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


def _once_per_slot(policy: Policy) -> dict[str, Any]:
    """What projection costs once: the basis build (empty cache) and one slot's A draw."""
    model, tok = load_base(policy.base_model)
    with tempfile.TemporaryDirectory() as cache:
        start, cpu = time.perf_counter(), time.process_time()
        protection = protect.protection_for(policy, model, tok, cache_dir=Path(cache))
        build = (time.perf_counter() - start, time.process_time() - cpu)
    stack = LayerStack(policy, model, tok, root_seed=SEED)
    spec = stack.spec(CREATOR)
    start, cpu = time.perf_counter(), time.process_time()
    spec.a_matrices()
    draw = (time.perf_counter() - start, time.process_time() - cpu)
    ranks = sorted({b.rank for b in protection.bases.values()}) if protection else []
    return {
        "basis_build_s": build[0] if protection else 0.0,
        "basis_build_cpu_s": build[1] if protection else 0.0,
        "basis_ranks": ranks,
        "a_draw_one_slot_s": draw[0],
        "a_draw_one_slot_cpu_s": draw[1],
    }


def _arm(
    name: str, policy: Policy, n_groups: int, args: argparse.Namespace, timed: _Timed
) -> dict[str, Any]:
    """Rounds of one arm at ``10 x n_groups`` compositions; per round and medians."""
    jurisdictions = [f"j{i}" for i in range(10)]
    groups = [f"g{i}" for i in range(n_groups)]
    profiles = frozenset((j, (g,)) for j in jurisdictions for g in groups)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        h = _harness(Path(tmp), policy)
        _seed_slots(h, jurisdictions, groups)
        runner = ProbeRunner(h.policy, h.stack, h.tokenizer)
        runner.suite(SUITE)  # suites load once per server, not per round
        for r in range(1, args.rounds + 1):
            timed.reset()
            wall, cpu = _round(h, runner, args.clients, r, profiles)
            work, work_cpu = timed.gate_s + timed.project_s, timed.gate_cpu_s + timed.project_cpu_s
            rows.append(
                {
                    "round": r,
                    "round_s": wall,
                    "round_cpu_s": cpu,
                    "gate_s": timed.gate_s,
                    "gate_cpu_s": timed.gate_cpu_s,
                    "projection_s": timed.project_s,
                    "projection_cpu_s": timed.project_cpu_s,
                    "projection_calls": timed.project_calls,
                    "report_s": timed.report_s,
                    "report_cpu_s": timed.report_cpu_s,
                    "redline_share": work / wall,
                    "redline_share_cpu": work_cpu / cpu,
                    "redline_share_cpu_without_report": work_cpu / (cpu - timed.report_cpu_s),
                    "redline_and_report_share_cpu": (work_cpu + timed.report_cpu_s) / cpu,
                    "load_avg": environment()["load_avg"],
                }
            )
            print(name, len(profiles), json.dumps(rows[-1]), flush=True)
    steady = rows[1:] or rows
    medians = {
        f"median_{k}": statistics.median(float(r[k]) for r in steady)
        for k in rows[0]
        if k not in ("round", "load_avg")
    }
    return {"arm": name, "compositions": len(profiles), **medians, "rounds": rows}


def _commit() -> str:
    """The repository's HEAD commit (short), or '' outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
        )
        return out.stdout.strip()
    except OSError:
        return ""


def main() -> None:
    """Run every arm at 10 and 100 compositions, print and write the JSON report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_env = environment()
    timed = _Timed()
    timed.install()
    base = policy()
    results, once = [], {}
    for name, arm in ARMS.items():
        armed = _armed(base, arm)
        once[name] = _once_per_slot(armed)
        for n_groups in (1, 10):
            results.append(_arm(name, armed, n_groups, args, timed))
    at_100 = {r["arm"]: r for r in results if r["compositions"] == 100}
    doc = {
        "benchmark": "P6 red-line work (gate + projection) at 10 and 100 compositions",
        "clients_per_round": args.clients,
        "torch_threads": 1,
        "commit": _commit(),
        "goal": f"all red-line work <= {GOAL:.0%} of the round at 100 compositions",
        "met": {k: r["median_redline_share_cpu"] <= GOAL for k, r in at_100.items()},
        "met_without_report": {
            k: r["median_redline_share_cpu_without_report"] <= GOAL for k, r in at_100.items()
        },
        "before": BEFORE,
        "once": once,
        "arms": [{k: v for k, v in r.items() if k != "rounds"} for r in results],
        "rounds": {f"{r['arm']}@{r['compositions']}": r["rounds"] for r in results},
        "machine": {**environment(), "load_avg_at_start": start_env["load_avg"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: v for k, v in doc.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
