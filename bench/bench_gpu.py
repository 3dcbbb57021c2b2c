"""One short GPU check (at most ~8 minutes): the GPU tests, a client step and the red-line gate.

On a machine with CUDA it
1. runs the tests marked ``gpu`` (``pytest -m gpu``, they skip without CUDA);
2. times one local client step (``Instance.train(steps=1)``) and
3. the batched red-line gate (every red-line suite on 8 compositions, plus the
   float32 re-score of one) on a ~0.5B random-weight Qwen2 base
   (:func:`bench_memory.random_base_folder`), in float32 and bfloat16;
and writes ``bench/results/gpu.json`` naming the GPU, with peak CUDA memory per dtype.

Without CUDA (or with ``--dry-run``) it runs the same steps on the CPU with the
gym's tiny base instead of the 0.5B one and writes ``gpu-dry-run.json``: a check
that the script works, not a measurement. Run:
``.venv/bin/python bench/bench_gpu.py [--dry-run] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import environment
from bench_memory import random_base_folder

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
COMPOSITIONS = 8


def _policy(folder: Path | None) -> Any:
    import yaml

    from layerfed.governance.schema import Policy
    from layerfed.simulation.base_folder import base_folder

    data = yaml.safe_load((ROOT / "examples/policies/default.yaml").read_text(encoding="utf-8"))
    if folder is not None:
        data = base_folder(folder, "llama").policy_data(data)
    return Policy.model_validate(data)


def run_tests(dry: bool) -> dict[str, Any]:
    """``pytest -m gpu`` (collect-only on a dry run): its exit code and last line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-m", "gpu"]
    cmd += ["tests/test_device_dtype.py", *(["--collect-only"] if dry else [])]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, timeout=240)
    lines = [x for x in done.stdout.splitlines() if x.strip()]
    return {"command": " ".join(cmd[1:]), "exit": done.returncode, "summary": lines[-1:]}


def bench_dtype(folder: Path | None, device: str, dtype: str) -> dict[str, Any]:
    """Client step and gate timings (seconds) and peak CUDA memory for one base dtype."""
    import numpy as np
    import torch

    from layerfed.clients.events import Thumbs
    from layerfed.clients.instance import Instance
    from layerfed.federation.probes import ProbeRunner
    from layerfed.layers.base import load_base

    policy = _policy(folder)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model, tok = load_base(policy.base_model, device=device, dtype=dtype)
    load_s = time.perf_counter() - t
    inst = Instance(
        policy, instance_id="bench", jurisdiction="eu", groups=("g1",), base=(model, tok)
    )
    inst.feedback(Thumbs(prompt="please tell cake", response="sure", up=True))
    inst.train(steps=1)  # warm-up (kernels, the reference copy)
    inst.feedback(Thumbs(prompt="please tell tea", response="sure", up=True))
    t = time.perf_counter()
    inst.train(steps=1)
    if cuda:
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t
    stack = inst.stack
    runner = ProbeRunner(policy, stack, tok)
    rng = np.random.default_rng(0)
    globals_ = [s for s in stack.active if s.layer != "individual"]
    comps = [
        {
            s: {
                k: rng.normal(0, 1e-3, v.shape).astype(np.float32)
                for k, v in stack.get_arrays(s).items()
            }
            for s in globals_
        }
        for _ in range(COMPOSITIONS)
    ]
    suites = [runner.suite(p.suite) for p in policy.red_lines.probes]
    runner.batch.margins(suites, comps[:1])  # warm-up
    t = time.perf_counter()
    runner.batch.margins(suites, comps)
    if cuda:
        torch.cuda.synchronize()
    gate_s = time.perf_counter() - t
    t = time.perf_counter()
    runner.margins_one(suites, comps[0])
    rescore_s = time.perf_counter() - t
    row = {
        "dtype": dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "load_s": round(load_s, 3),
        "client_step_s": round(step_s, 3),
        "gate_s": round(gate_s, 3),
        "gate_compositions": COMPOSITIONS,
        "rescore_one_f32_s": round(rescore_s, 3),
        "exact_margin": runner.exact_margin,
    }
    if cuda:
        row["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    del inst, stack, runner, model
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    """Run the check; write the JSON (gpu.json with a GPU, gpu-dry-run.json without)."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny base: check the script")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/layerfed-0p5b"))
    args = parser.parse_args()
    dry = args.dry_run or not torch.cuda.is_available()
    device = "cpu" if dry else "cuda"
    started = time.perf_counter()
    folder = None if dry else random_base_folder(args.folder)
    tests = run_tests(dry)
    rows = [bench_dtype(folder, device, dtype) for dtype in ("float32", "bfloat16")]
    gpu = None if dry else torch.cuda.get_device_name(0)
    result = {
        "benchmark": "GPU check: gpu tests, client step, red-line gate",
        "dry_run": dry,
        "device": gpu or "cpu (dry run: the gym's tiny base, not a measurement)",
        "base": "random-weight Qwen2 ~0.5B (bench_memory.CONFIG)" if folder else "builtin tiny",
        "environment": {**environment(), "torch": torch.__version__, "cuda": torch.version.cuda},
        "tests": tests,
        "runs": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = args.out or ROOT / "bench/results" / ("gpu-dry-run.json" if dry else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("device", "tests", "runs", "seconds")}, indent=1))
    print(f"wrote {out}")
    if tests["exit"] not in (0, 5):  # 5: no tests collected
        raise SystemExit(f"gpu tests failed: {tests['summary']}")


if __name__ == "__main__":
    main()
