"""Memory per instance: a ~0.5B random-weight base in float32 and bfloat16, side by side.

Nothing is downloaded: a Qwen2 config (hidden 1024, 24 layers, vocab 32k, ~0.5B
parameters) with random weights is saved once as a bfloat16 Hugging Face folder (the
way such models ship) with the gym's tokenizer, and each dtype runs in its own
process so its peak resident set is its own. Stages, each with the process's RSS now
and its peak so far (and CUDA memory when the base runs on a GPU):

- ``base``: ``load_base`` in the dtype;
- ``stack``: the layer stack with an instance's slots active (the policy's scopes
  mapped onto Llama/Qwen2 names, ``examples/scope-maps/llama.yaml``);
- ``probes``: the red-line suites measured on a composition with random B (the
  batched gate path and one float32 re-score) -- no second base;
- ``superego``: the instance's superego built (its teacher is a table of first-token
  log-probs on its probe prompts, computed on the stack's base: no copy);
- ``train``: one local training step of the instance (the losses' reference runs on
  the live weights: no second base; see the JSON's notes).

Run: ``.venv/bin/python bench/bench_memory.py [--device cpu] [--out bench/results/memory.json]``
(about 2-3 minutes on a loaded CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
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

__all__ = ["main", "random_base_folder"]

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = 4
"""Probe prompts per red-line suite in the ``probes`` stage."""
CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 5120,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "tie_word_embeddings": True,
    "max_position_embeddings": 2048,
}


def random_base_folder(folder: Path) -> Path:
    """A ~0.5B Qwen2 with random weights and the gym's tokenizer, saved in bfloat16."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from layerfed.simulation.tiny import build_tiny_tokenizer

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = Qwen2Config(**CONFIG)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def _rss_mib() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(folder: Path, dtype: str, device: str) -> dict[str, Any]:
    """The stages of one instance in ``dtype`` (this process): RSS and peaks in MiB."""
    import numpy as np
    import torch
    import yaml

    from layerfed.clients.events import Thumbs
    from layerfed.clients.instance import Instance
    from layerfed.federation.probes import ProbeRunner
    from layerfed.governance.schema import Policy
    from layerfed.layers.base import load_base
    from layerfed.layers.stack import LayerStack
    from layerfed.simulation.base_folder import base_folder

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    data = yaml.safe_load((ROOT / "examples/policies/default.yaml").read_text(encoding="utf-8"))
    policy = Policy.model_validate(base_folder(folder, "llama").policy_data(data))
    stages: list[dict[str, Any]] = []
    cuda = device.startswith("cuda")

    def stage(name: str, started: float) -> None:
        row = {
            "stage": name,
            "rss_mib": round(_rss_mib(), 1),
            "peak_rss_mib": round(_peak_mib(), 1),
            "seconds": round(time.perf_counter() - started, 2),
        }
        if cuda:
            row["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        stages.append(row)
        print(f"{dtype} {row}", file=sys.stderr, flush=True)

    t = time.perf_counter()
    stage("imports", t)
    model, tok = load_base(policy.base_model, device=device, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    stage("base", t)
    inst = Instance(
        policy, instance_id="bench", jurisdiction="eu", groups=("g1",), base=(model, tok)
    )
    stack: LayerStack = inst.stack
    stage("stack", t)
    runner = ProbeRunner(policy, stack, tok)
    rng = np.random.default_rng(0)
    comp = {
        s: {
            k: rng.normal(0, 1e-3, v.shape).astype(np.float32)
            for k, v in stack.get_arrays(s).items()
        }
        for s in stack.active
        if s.layer != "individual"
    }
    suites = [  # a few prompts per suite: memory, not speed (a full gate pass is minutes on a CPU)
        dataclasses.replace(runner.suite(p.suite), prompts=runner.suite(p.suite).prompts[:PROMPTS])
        for p in policy.red_lines.probes
    ]
    runner.batch.margins(suites, [comp])
    runner.margins_one(suites, comp)  # the float32 re-score path on a narrow base
    stage("probes", t)
    stack.activate(inst.slots)  # the re-score composed only the shared slots
    ego = inst.superego  # built on first use: its teacher table, no copy of the base
    stage("superego", t)
    inst.feedback(Thumbs(prompt="please tell cake", response="sure", up=True))
    inst.train(steps=1)
    stage("train", t)
    teacher = None if ego is None else ego.teacher
    table = None if teacher is None else list(teacher.shape)
    return {
        "dtype": dtype,
        "device": device,
        "parameters": params,
        "teacher_table": table,
        "stages": stages,
    }


def main() -> None:
    """Build the folder once, run each dtype in its own process, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--folder", type=Path, default=Path(tempfile.gettempdir()) / "layerfed-0p5b"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/memory.json")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.folder, args.child, args.device)))
        return
    started = time.perf_counter()
    random_base_folder(args.folder)
    rows = []
    for dtype in args.dtypes.split(","):
        cmd = [sys.executable, __file__, "--child", dtype, "--device", args.device]
        cmd += ["--folder", str(args.folder)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{dtype}: child failed\n{done.stderr[-4000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {
        "benchmark": "memory per instance, ~0.5B random-weight Qwen2 (bf16 folder)",
        "config": CONFIG,
        "environment": environment(),
        "seconds": round(time.perf_counter() - started, 1),
        "runs": rows,
        "notes": [
            "rss_mib: resident now; peak_rss_mib: the process's peak so far (ru_maxrss)",
            "train: one base per process -- the losses' reference runs on the live weights "
            "(a snapshot of the trained B, clients/local_train.FrozenView) and the superego's "
            "teacher is a [probes, vocab] float32 table of first-token log-probs",
            "probes: batched gate + one float32 re-score on the stack's own base (no copy)",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for run in rows:
        line = ", ".join(
            f"{s['stage']} {s['rss_mib']:.0f}/{s['peak_rss_mib']:.0f}" for s in run["stages"]
        )
        print(f"{run['dtype']:>9} {run['parameters'] / 1e6:.0f}M params: {line} MiB (rss/peak)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
