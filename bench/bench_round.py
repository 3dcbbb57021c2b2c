"""Benchmark 2: a governed layerfed round against a plain Flower FedAvg round.

Same machine, same process (two Flower simulations one after the other), same
tiny model, same simulated clients and examples, same local training code
(:func:`layerfed.federation.trainer.train_slot`), same number of clients per
round. The plain round is Flower's own ``FedAvg`` over one LoRA adapter with
no signing, verification, validation, vetoes, probes, audit or checkpoint.
The governed round is ``layerfed simulate`` with the default policy on a scenario
of 12 instances that all feed the community layer (10 sampled per round), so both
sides train the same slot on the same examples; the governed side also composes
the instance's other slots, signs, verifies, validates, runs the creator's probe
and scope vetoes and the government's norm veto, audits and checkpoints. Round time is
the time between successive round ends (Flower's loop, both sides); the first
round (Ray workers warming up) is dropped.

    .venv/bin/python bench/bench_round.py [--rounds 6] [--out bench/results/round.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from layerfed.federation.client_app import _runtime
from layerfed.federation.protocol import arrays_from_record, arrays_to_record
from layerfed.federation.settings import RunSettings
from layerfed.federation.simulate import simulate
from layerfed.federation.trainer import train_slot
from layerfed.layers.base import load_base
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack
from layerfed.simulation.world import examples_for

RESULTS = Path(__file__).resolve().parent / "results" / "round.json"
SLOT = SlotId("community", "global")
SCENARIO = """
name: bench-round
seed: 0
rounds: 8
populations:
  - {count: 12, id_prefix: n-, layers: [community], user: {kind: aligned, examples: 12}}
sample_per_layer: {community: 10}
"""


def _plain_apps(
    settings: RunSettings, clients: int, marks: list[float]
) -> tuple[ServerApp, ClientApp]:
    client = ClientApp()
    cache: dict[str, Any] = {}

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        # The same per-process runtime the governed ClientApp uses (a closure's state does
        # not survive between Ray tasks; a module-level cache does).
        rt = _runtime(settings)
        cache.update(stack=rt.stack, tok=rt.tokenizer, policy=rt.policy)
        stack: LayerStack = cache["stack"]
        stack.activate([SLOT])
        stack.set_arrays(
            SLOT, arrays_from_record(msg.content.array_records["arrays"], where="arrays")
        )
        index = int(context.node_config["partition-id"])
        rnd = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
        rng = np.random.default_rng([0, rnd, index, 29])
        examples = examples_for("community", "aligned", None, 12, rng)
        layer = cache["policy"].layer("community")
        result = train_slot(stack, SLOT, layer, cache["tok"], examples, seed=rnd)
        current = stack.get_arrays(SLOT)
        new = {k: current[k] + result.delta[k] for k in current}
        content = RecordDict(
            {
                "arrays": arrays_to_record(new),
                "metrics": MetricRecord({"num-examples": result.num_examples}),
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
            marks.append(time.perf_counter())
            return None

        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=settings.rounds,
            train_config=ConfigRecord(),
            evaluate_fn=stamp,
        )

    return server, client


def run(rounds: int) -> dict[str, Any]:
    """Both rounds side by side; returns the JSON document."""
    for noisy in ("flwr", "ray", "alembic"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    tmp_dir = Path(tempfile.mkdtemp())
    scenario = tmp_dir / "scenario.yaml"
    scenario.write_text(SCENARIO)
    settings = RunSettings(rounds=rounds, scenario=str(scenario)).resolved()
    plain_marks: list[float] = []
    server, client = _plain_apps(settings, 10, plain_marks)
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": 2, "include_dashboard": False},
    }
    run_simulation(server_app=server, client_app=client, num_supernodes=12, backend_config=backend)  # type: ignore[arg-type]
    governed_marks: list[float] = []
    simulate(
        RunSettings(rounds=rounds, out=str(tmp_dir / "out"), scenario=str(scenario)),
        on_round=lambda m: governed_marks.append(time.perf_counter()),
    )
    plain = np.diff(plain_marks)[1:]  # marks: before round 1, after each round; drop warm-up round
    governed = np.diff(governed_marks)
    p, g = statistics.median(plain.tolist()), statistics.median(governed.tolist())
    return {
        "benchmark": "governed_round_vs_flower_fedavg_round",
        "machine": {"cpus": 2, "python": platform.python_version()},
        "rounds": rounds,
        "clients_per_round": 10,
        "plain_round_s": plain.tolist(),
        "governed_round_s": governed.tolist(),
        "plain_median_s": p,
        "governed_median_s": g,
        "ratio": g / p,
        "goal": "<= 1.15",
    }


def main() -> None:
    """Run and write the JSON result."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        json.dumps(
            {k: result[k] for k in ("plain_median_s", "governed_median_s", "ratio")}, indent=2
        )
    )


if __name__ == "__main__":
    main()
