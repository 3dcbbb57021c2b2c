"""Benchmark: what the gym's suite costs (issue #25 item 8: 10 seeds in <= 25 min on 2 cores).

Runs ``layerfed experiment run NAME --seeds S`` once per experiment (niced), each in
its own process, and measures the CPU seconds (user + sys) of its whole process tree:
Flower's Ray workers included. This process makes itself the tree's child subreaper,
so Ray's orphaned workers are reaped here and their time lands in
``getrusage(RUSAGE_CHILDREN)``. Beside the CPU seconds it records wall seconds and the
load average before and after (2 cores shared with other work: wall is noisy, CPU less).

The 10-seed estimate (printed and stored with its formula): an experiment's CPU at
``S`` seeds is a fixed start-up ``c0`` (imports, Ray, the bases) plus ``S`` times its
per-seed cost, so per seed ``(cpu - c0) / S``; ``c0`` is measured once by running the
smallest experiment at 1 and 2 seeds (``c0 = 2 cpu(1) - cpu(2)``, at least 0). The suite
at ``N`` seeds runs in one process: ``cpu(N) = c0 + N * sum(per seed)``, and its wall on
2 cores is about ``cpu(N) / 2`` when both cores are busy (the lanes keep them busy).

    .venv/bin/python bench/bench_gym.py --seeds 1 --label after [--only turkey,veto]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import errno
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import environment

RESULTS = Path(__file__).resolve().parent / "results" / "gym_suite.json"
GOAL_MINUTES = 25.0
GOAL_SEEDS = 10
GOAL_CORES = 2
ROOT = Path(__file__).resolve().parent.parent
PR_SET_CHILD_SUBREAPER = 36


def _subreaper() -> None:
    """Adopt orphaned descendants (Ray's workers), so their CPU time is counted here."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _reap(deadline_s: float = 60.0) -> None:
    """Wait for every adopted descendant to exit (Ray shuts its workers down)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        except OSError as e:  # pragma: no cover - other errors than ECHILD
            if e.errno == errno.ECHILD:
                return
            raise
        if pid == 0:
            time.sleep(0.1)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(name: str, seeds: int, out: Path) -> dict[str, Any]:
    """Run one experiment at ``seeds`` seeds niced; its tree's CPU seconds, wall, load."""
    cmd = [
        "nice", "-n", "10", str(ROOT / ".venv" / "bin" / "layerfed"), "experiment", "run",
        name, "--seeds", str(seeds), "--out", str(out),
    ]  # fmt: skip
    load_before = [round(x, 2) for x in os.getloadavg()]
    cpu0, wall0 = _children_cpu(), time.monotonic()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.monotonic() - wall0
    _reap()
    cpu = _children_cpu() - cpu0
    row = {
        "experiment": name,
        "seeds": seeds,
        "cpu_s": round(cpu, 1),
        "wall_s": round(wall, 1),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "returncode": proc.returncode,
        "runs": sum(1 for _ in out.glob("*/*/seed-*/gym.json")),
    }
    print(json.dumps(row), flush=True)
    return row


def suite_names() -> list[str]:
    """The experiments ``layerfed experiment run all`` runs (``in_all``)."""
    from layerfed.simulation.experiment_spec import list_experiments

    return [s.name for s in list_experiments(check=False) if s.in_all]


def estimate(rows: list[dict[str, Any]], c0: float, seeds: int) -> dict[str, Any]:
    """The suite's CPU and 2-core wall at ``seeds`` seeds from per-experiment rows."""
    per_seed = {r["experiment"]: max(0.0, r["cpu_s"] - c0) / r["seeds"] for r in rows}
    cpu = c0 + seeds * sum(per_seed.values())
    return {
        "formula": "cpu(N) = c0 + N * sum_e (cpu_e(S) - c0) / S; wall(N) ~ cpu(N) / 2 cores",
        "c0_cpu_s": round(c0, 1),
        "per_seed_cpu_s": {k: round(v, 1) for k, v in per_seed.items()},
        "seeds": seeds,
        "cpu_s": round(cpu, 1),
        "wall_min_2_cores": round(cpu / GOAL_CORES / 60, 1),
        "goal_min": GOAL_MINUTES,
        "meets_goal": cpu / GOAL_CORES / 60 <= GOAL_MINUTES,
    }


def _git() -> dict[str, Any]:
    def out(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {"commit": out("rev-parse", "HEAD"), "dirty": bool(out("status", "--porcelain"))}


def main() -> None:
    """Measure, estimate, and store the result under its label in gym_suite.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--only", default="", help="Comma-separated experiments (default: all).")
    parser.add_argument("--label", default="after", help="Key of this measurement (before/after).")
    parser.add_argument("--c0", type=float, default=None, help="Start-up CPU s (skip measuring).")
    parser.add_argument("--together", action="store_true", help="--only's names in one process.")
    parser.add_argument("--keep", type=Path, default=None, help="Keep the runs in this folder.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    _subreaper()
    names = [n for n in args.only.split(",") if n] or suite_names()
    env = environment()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="bench-gym-") as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        groups = [",".join(names)] if args.together else names
        rows = [measure(n, args.seeds, Path(tmp) / f"{n}-s{args.seeds}") for n in groups]
        c0 = args.c0
        c0_rows: list[dict[str, Any]] = []
        if c0 is None:
            cheapest = min(rows, key=lambda r: r["cpu_s"])
            one = (
                cheapest
                if cheapest["seeds"] == 1
                else measure(cheapest["experiment"], 1, Path(tmp) / "c0-1")
            )
            two = measure(cheapest["experiment"], 2, Path(tmp) / "c0-2")
            c0_rows = [one, two]
            c0 = max(0.0, 2 * one["cpu_s"] - two["cpu_s"])
    env["load_avg_after"] = environment()["load_avg"]
    result = {
        "benchmark": "gym_suite_cpu_seconds",
        "machine": env,
        "git": _git(),
        "started_utc": started,
        "goal": f"{GOAL_SEEDS} seeds of `experiment run all` in <= {GOAL_MINUTES} min on {GOAL_CORES} cores",
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "rows": rows,
        "c0_rows": c0_rows,
        "estimate": estimate(rows, c0, GOAL_SEEDS),
    }
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc[args.label] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(result["estimate"], indent=1))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
