"""Benchmark P2: a governed layerfed round against a plain Flower FedAvg round.

Same machine, same process (two Flower simulations one after the other), same
tiny model and per-process runtime (:class:`~layerfed.simulation.client.GymSource`),
same simulated clients and examples, same local training code
(:func:`layerfed.clients.local_train.train_on_events` on the same demonstrations
and seeds), same number of clients per round. The plain round is Flower's own
``FedAvg`` over one LoRA adapter with no signing, verification, validation,
vetoes, probes, audit or checkpoint.
The governed round is ``layerfed simulate`` with the default policy on a scenario
of 12 instances that all feed the community layer (10 sampled per round), so both
sides train the same slot on the same examples; the governed side also composes
the instance's other slots, signs, verifies, validates, runs the creator's probe
and scope vetoes and the government's norm veto, audits and checkpoints. Round time is
the time between successive round ends (Flower's loop, both sides); the first
round (Ray workers warming up) is dropped. Next to wall time, each round's CPU seconds
over the whole process tree (this process and Ray's workers, psutil) are reported: round
wall times swing with Ray's scheduling on a small machine, CPU seconds much less.
Goal: governed <= 1.05x plain.

    .venv/bin/python bench/bench_round.py [--rounds 8] [--repeats 2] [--out bench/results/round.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from layerfed.clients.events import Demonstration
from layerfed.clients.local_train import train_on_events
from layerfed.layers.base import load_base
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack
from layerfed.simulation.client import GymSource
from layerfed.simulation.settings import SimSettings
from layerfed.simulation.simulate import simulate
from layerfed.simulation.world import examples_for
from layerfed.wire.protocol import arrays_from_record, arrays_to_record

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import environment

RESULTS = Path(__file__).resolve().parent / "results" / "round.json"
GOAL = 1.05
"""Most governed / plain round time allowed (goal P2)."""
SLOT = SlotId("community", "global")
SCENARIO = """
name: bench-round
seed: 0
rounds: 8
populations:
  - {count: 12, id_prefix: n-, layers: [community], user: {kind: aligned, examples: 12}}
sample_per_layer: {community: 10}
"""


def _tree_cpu() -> float:
    """CPU seconds so far of this process and all its descendants (Ray's workers included)."""
    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _mark(marks: list[tuple[float, float]]) -> None:
    marks.append((time.perf_counter(), _tree_cpu()))


def _per_round(marks: list[tuple[float, float]], skip: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds between successive marks, the first ``skip`` intervals dropped."""
    wall = np.diff([m[0] for m in marks])[skip:]
    cpu = np.diff([m[1] for m in marks])[skip:]
    return [float(x) for x in wall], [float(x) for x in cpu]


def _plain_apps(
    settings: SimSettings, clients: int, marks: list[tuple[float, float]]
) -> tuple[ServerApp, ClientApp]:
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        # The governed ClientApp's per-process runtime (model, tokenizer, stack): a
        # GymSource caches it per worker process, whichever source object asks.
        rt = GymSource(settings).runtime(msg, context)
        stack: LayerStack = rt.stack
        stack.activate([SLOT])
        stack.set_arrays(
            SLOT, arrays_from_record(msg.content.array_records["arrays"], where="arrays")
        )
        index = int(context.node_config["partition-id"])
        rnd = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
        rng = np.random.default_rng([settings.seed, rnd, index, 29])  # as GymSource.plan
        examples = examples_for("community", "aligned", None, 12, rng)
        demos = [
            Demonstration(prompt=e.prompt, response=e.response, weight=e.weight) for e in examples
        ]
        layer = rt.policy.layer("community")
        seed = int(np.random.SeedSequence([settings.seed, rnd, index, 17]).generate_state(1)[0])
        result = train_on_events(stack, SLOT, layer, stack.tokenizer, demos, seed=seed)
        current = stack.get_arrays(SLOT)
        new = {k: current[k] + result.delta[k] for k in current}
        content = RecordDict(
            {
                "arrays": arrays_to_record(new),
                "metrics": MetricRecord({"num-examples": result.num_events}),
            }
        )
        return Message(content, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        policy = settings.load_policy()
        model, tokenizer = load_base(policy.base_model)
        stack = LayerStack(policy, model, tokenizer)
        stack.activate([SLOT])
        initial = arrays_to_record(stack.get_arrays(SLOT))
        strategy = FedAvg(
            fraction_train=clients / 12,
            min_train_nodes=clients,
            min_available_nodes=12,
            fraction_evaluate=0.0,
        )

        def stamp(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            _mark(marks)
            return None

        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=settings.rounds,
            train_config=ConfigRecord(),
            evaluate_fn=stamp,
        )

    return server, client


BREAKDOWN = {
    "server: process_replies (verify, validate, aggregate, vetoes, commit)": (
        "layerfed.federation.strategy",
        "process_replies",
    ),
    "server: probe forward passes (vetoes, red-line gate, round metrics)": (
        "layerfed.layers.probe_batch",
        "BatchedProbes.margins",
    ),
    "server: probes re-scored one composition at a time (margin near zero)": (
        "layerfed.federation.probes",
        "ProbeRunner.margins_one",
    ),
    "server: red-line gate (compositions)": ("layerfed.federation.stages.judge", "redline_breach"),
    "server: slot store save (files + fsyncs)": ("layerfed.layers.store", "SlotStore.save"),
    "server: checkpoint (metrics.json, signed state.json, fsyncs)": (
        "layerfed.federation.server_state",
        "ServerState.checkpoint",
    ),
    "server: configure_train (sample, tasks, slot records)": (
        "layerfed.federation.strategy",
        "LayeredStrategy.configure_train",
    ),
}
"""Where the governed server's time goes: wall seconds inside each, per round (the bench's
own process runs the ServerApp, so wrapping these functions here measures them there)."""


def _instrument() -> dict[str, list[float]]:
    """Wrap the :data:`BREAKDOWN` functions with timers (this process only); returns the log."""
    import functools
    import importlib

    spent: dict[str, list[float]] = {name: [] for name in BREAKDOWN}
    for name, (module_name, attr) in BREAKDOWN.items():
        module: Any = importlib.import_module(module_name)
        owner, _, fn_name = attr.rpartition(".")
        target = getattr(module, owner) if owner else module
        original = getattr(target, fn_name)

        def timed(*args: Any, _f: Any = original, _n: str = name, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                spent[_n].append(time.perf_counter() - start)

        setattr(target, fn_name, functools.wraps(original)(timed))
    return spent


def _plain(settings: SimSettings) -> tuple[list[float], list[float]]:
    marks: list[tuple[float, float]] = []
    server, client = _plain_apps(settings, 10, marks)
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False},
    }
    run_simulation(server_app=server, client_app=client, num_supernodes=12, backend_config=backend)  # type: ignore[arg-type]
    return _per_round(marks, 1)  # marks: before round 1, after each; drop round 1


def _governed(settings: SimSettings, out: Path) -> tuple[list[float], list[float]]:
    marks: list[tuple[float, float]] = []
    simulate(
        SimSettings(rounds=settings.rounds, out=str(out), scenario=settings.scenario),
        on_round=lambda m: _mark(marks),
    )
    return _per_round(marks, 0)  # round ends: rounds 2..R


def run(rounds: int, repeats: int, breakdown: bool = False) -> dict[str, Any]:
    """Both rounds side by side, alternating ``repeats`` times; returns the JSON document."""
    for noisy in ("flwr", "ray", "alembic"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    env = environment()
    tmp_dir = Path(tempfile.mkdtemp())
    scenario = tmp_dir / "scenario.yaml"
    scenario.write_text(SCENARIO)
    settings = SimSettings(rounds=rounds, scenario=str(scenario)).resolved()
    plain: list[float] = []
    governed: list[float] = []
    plain_cpu: list[float] = []
    governed_cpu: list[float] = []
    pairs = []
    spent = _instrument() if breakdown else {}
    for r in range(repeats):
        p_rounds, p_cpu = _plain(settings)
        g_rounds, g_cpu = _governed(settings, tmp_dir / f"out-{r}")
        plain += p_rounds
        governed += g_rounds
        plain_cpu += p_cpu
        governed_cpu += g_cpu
        pairs.append(statistics.median(g_rounds) / statistics.median(p_rounds))
    p, g = statistics.median(plain), statistics.median(governed)
    p_c, g_c = statistics.median(plain_cpu), statistics.median(governed_cpu)
    return {
        "benchmark": "governed_round_vs_flower_fedavg_round",
        "machine": {**env, "load_avg_after": environment()["load_avg"]},
        "rounds": rounds,
        "repeats": repeats,
        "clients_per_round": 10,
        "plain_round_s": plain,
        "governed_round_s": governed,
        "plain_median_s": p,
        "governed_median_s": g,
        "ratio": g / p,
        "ratio_per_repeat": pairs,
        "plain_round_cpu_s": plain_cpu,
        "governed_round_cpu_s": governed_cpu,
        "plain_cpu_median_s": p_c,
        "governed_cpu_median_s": g_c,
        "ratio_cpu": g_c / p_c,
        "goal": f"<= {GOAL}",
        "governed_breakdown_s_per_round": {
            k: sum(v) / (repeats * rounds) for k, v in spent.items() if v
        },
    }


def main() -> None:
    """Run and write the JSON result."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--breakdown", action="store_true", help="time the governed server's parts (adds overhead)"
    )
    args = parser.parse_args()
    result = run(args.rounds, args.repeats, args.breakdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    keys = ("plain_median_s", "governed_median_s", "ratio", "ratio_per_repeat", "ratio_cpu")
    if args.breakdown:
        keys += ("governed_breakdown_s_per_round",)
    print(json.dumps({k: result[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
