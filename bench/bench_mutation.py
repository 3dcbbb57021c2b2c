"""Mutation score of the gym's verdict and metric code (issue #25 item 7), with mutmut.

mutmut 3 imports the mutated code from ``mutants/`` by the module name its path gives,
so it needs the package under its own name: the repository root *is* the package
``layerfed`` (a strict editable link tree under ``build/``), so this script copies the
tracked sources into ``WORKDIR/layerfed/`` and runs mutmut from ``WORKDIR`` with
``source_paths`` ``layerfed/simulation/{verdicts,stats,metrics}.py``, the whole package as
``also_copy`` (mutmut puts ``mutants/`` first on ``sys.path``, ahead of the link tree) and
the unit tests of those modules (not the slow simulations). Each mutant runs the tests
that cover its function (mutmut's own coverage), in a forked child.

A time limit stops the run; the mutants not reached are reported as ``not checked``. The
score is killed / (killed + survived + timeout), over the mutants checked. Output:
``bench/results/mutation.json`` (tool, version, files, counts, score, every surviving
mutant's name and diff, the CPU and load average).

    nice -n 10 .venv/bin/python bench/bench_mutation.py [--time-limit 3000] [--children 1]
    .venv/bin/python bench/bench_mutation.py --collect --workdir DIR   # an earlier run's results
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _machine import environment  # noqa: E402

FILES = ("simulation/verdicts.py", "simulation/stats.py", "simulation/metrics.py")
TESTS = (
    "tests/test_stats.py",
    "tests/test_stats_ci.py",
    "tests/test_verdicts.py",
    "tests/test_metrics.py",
    "tests/test_stats_mutants.py",
    "tests/test_mechanism_counters.py",
)
STATUS = {1: "killed", 3: "killed", 0: "survived", 36: "timeout", 24: "timeout", -24: "timeout"}
STATUS |= {152: "timeout", 255: "timeout", None: "not checked", 5: "no tests", 33: "no tests"}
SKIP = {".git", ".venv", "build", "mutants", "__pycache__", ".mypy_cache", ".ruff_cache"}


def _copy_package(dest: Path) -> None:
    """The repository's files (no virtualenv, build, caches or results) under ``dest``."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n in SKIP or n.startswith(".hypothesis")}
        if Path(folder).resolve() == HERE:
            skip.add("results")
        return skip

    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)


def _setup(workdir: Path) -> None:
    lines = ["[mutmut]", "source_paths="]
    lines += [f"    layerfed/{f}" for f in FILES]
    lines += ["also_copy=", "    layerfed", "pytest_add_cli_args_test_selection="]
    lines += [f"    layerfed/{t}" for t in TESTS]
    lines += ["pytest_add_cli_args="]
    lines += [f"    {a}" for a in ("-p", "no:randomly", "-m", "not slow", "-x", "-q")]
    (workdir / "setup.cfg").write_text("\n".join(lines) + "\n")


def _run(workdir: Path, children: int, limit: float) -> dict[str, Any]:
    """``mutmut run`` in ``workdir`` until done or ``limit`` seconds (then stopped)."""
    env = dict(os.environ, LAYERFED_FAST="1")
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mutmut"), "run", "--max-children", str(children)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        proc.wait(timeout=limit)
        stopped = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        stopped = True
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall_s": round(time.monotonic() - started, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "stopped_at_time_limit": stopped,
        "returncode": proc.returncode,
    }


def _show(workdir: Path, name: str) -> str:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "mutmut"), "show", name],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout.strip()


def collect(workdir: Path, diffs: int = 80) -> dict[str, Any]:
    """Counts and survivors from the ``.meta`` files mutmut wrote in ``workdir/mutants``."""
    by_file: dict[str, Counter[str]] = {}
    survivors: list[str] = []
    for meta in sorted((workdir / "mutants").rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        name = str(meta.relative_to(workdir / "mutants"))[: -len(".meta")]
        counts: Counter[str] = Counter(STATUS.get(c, "suspicious") for c in codes.values())
        by_file[name] = counts
        survivors += sorted(k for k, c in codes.items() if STATUS.get(c) == "survived")
    total: Counter[str] = sum(by_file.values(), Counter())
    checked = total["killed"] + total["survived"] + total["timeout"]
    return {
        "mutants": sum(total.values()),
        **{k: total[k] for k in ("killed", "survived", "timeout", "not checked", "no tests")},
        "suspicious": total["suspicious"],
        "score": round(total["killed"] / checked, 4) if checked else None,
        "score_definition": "killed / (killed + survived + timeout), over the mutants checked",
        "by_file": {f: dict(c) for f, c in by_file.items()},
        "survivors": [
            {"name": s, "diff": _show(workdir, s) if i < diffs else ""}
            for i, s in enumerate(survivors)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--children", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=3000.0)
    parser.add_argument("--collect", action="store_true", help="only read an earlier run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "mutation.json")
    parser.add_argument("--diffs", type=int, default=80, help="surviving mutants shown as diffs")
    parser.add_argument("--note", default="", help="a remark stored with the results")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="layerfed-mutmut-"))
    run: dict[str, Any] = {}
    if not args.collect:
        _copy_package(workdir / "layerfed")
        _setup(workdir)
        run = _run(workdir, args.children, args.time_limit)
    record = {
        "tool": "mutmut",
        "version": version("mutmut"),
        "files": list(FILES),
        "tests": list(TESTS),
        "command": f"mutmut run --max-children {args.children}",
        "config": (workdir / "setup.cfg").read_text(),
        "run": run,
        "note": args.note,
        **collect(workdir, args.diffs),
        "machine": environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in ("survivors", "by_file")}))


if __name__ == "__main__":
    main()
