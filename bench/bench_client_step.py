"""Benchmark P5: one local training step with every slot composed against a bare PEFT step.

Same tiny base model (the policy's), same batch (8 demonstrations of the gym's
world, the supervised loss :func:`layerfed.clients.supervised.supervised_loss`),
same optimizer (Adam), one thread. Three models train side by side, their steps
interleaved in blocks so load on the machine hits all of them alike:

- **bare PEFT** (the anchor): ``get_peft_model`` with ONE LoRA adapter of the
  trained slot's config (rank, alpha, target modules), only B trainable (as ours:
  A is frozen; training A too would make the anchor slower).
- **composed, merged** (ours, what :func:`~layerfed.clients.local_train.train_on_events`
  runs): a :class:`~layerfed.layers.LayerStack` with creator, government, community,
  in-group and individual slots composed (all with non-zero B), training one slot
  (every memory at its own rate) inside :meth:`LayerStack.training`: the frozen
  slots merged into the base, only the trained slot live.
- **composed, live**: the same stack with ``merge_frozen = False`` (every adapter in
  the forward and backward pass), i.e. without the optimisation.

A step is ``zero_grad``, forward, loss, backward, ``optimizer.step``. Reported: the
median per-step wall and CPU (thread) time of each, their ratios to the anchor,
and the merge + unmerge cost of one training call (paid once per call of
``layer.local.steps`` steps), for two trained slots: the individual slot (what
every instance trains; 2 memories) and the creator slot (rank 8 on 8 modules).

    .venv/bin/python bench/bench_client_step.py [--blocks 15] [--steps 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import environment

from layerfed.clients.events import Demonstration
from layerfed.clients.supervised import encode_demonstrations, supervised_loss
from layerfed.layers.base import load_base
from layerfed.layers.slots import SlotId, slots_for_instance
from layerfed.layers.stack import LayerStack
from layerfed.simulation.settings import SimSettings
from layerfed.simulation.world import examples_for

RESULTS = Path(__file__).resolve().parent / "results" / "client_step.json"
GOAL = 1.1
"""Most composed / bare PEFT step time allowed (goal P5)."""
INSTANCE = ("i-7", "eu", ["g1"])
Batch = dict[str, torch.Tensor]


def _batch(tokenizer: Any) -> Batch:
    rng = np.random.default_rng(0)
    examples = examples_for("individual", "stylist", "great", 8, rng)
    demos = [Demonstration(prompt=e.prompt, response=e.response, weight=e.weight) for e in examples]
    return encode_demonstrations(tokenizer, demos)


class Trainer:
    """One model and its Adam optimizer; :meth:`step` is one timed training step."""

    def __init__(self, model: torch.nn.Module, groups: list[dict[str, Any]], batch: Batch) -> None:
        self.model, self.batch = model, batch
        self.optimizer = torch.optim.Adam(groups)
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def step(self) -> None:
        """zero_grad, forward, loss, backward, optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        supervised_loss(self.model, self.batch).backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()

    def block(self, steps: int) -> None:
        """``steps`` steps; records the per-step wall and CPU time of the block."""
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(steps):
            self.step()
        self.wall.append((time.perf_counter() - wall) / steps)
        self.cpu.append((time.thread_time() - cpu) / steps)


def _stack(policy: Any, model: torch.nn.Module, tokenizer: Any, merge: bool) -> LayerStack:
    stack = LayerStack(policy, model, tokenizer)
    stack.merge_frozen = merge
    slots = slots_for_instance(policy, *INSTANCE)
    stack.activate(slots)
    for i, slot in enumerate(slots):  # every slot non-zero, as after a few rounds
        rng = np.random.default_rng([1, i])
        shapes = {k: v.shape for k, v in stack.get_arrays(slot).items()}
        stack.set_arrays(
            slot, {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in shapes.items()}
        )
    return stack


def _bare(policy: Any, stack: LayerStack, slot: SlotId, base: torch.nn.Module) -> Trainer:
    spec = stack.spec(slot)
    model = get_peft_model(base, LoraConfig(**spec.peft_config()))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_B" in name)
    lr = policy.layer(slot.layer).local.lr
    return Trainer(
        model,
        [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}],
        _batch(stack.tokenizer),
    )


def _groups(stack: LayerStack, slot: SlotId) -> list[dict[str, Any]]:
    lr = stack.policy.layer(slot.layer).local.lr
    return [{"params": p, "lr": lr * m} for p, m in stack.memory_lrs(slot)]


def _merge_cost(stack: LayerStack, slot: SlotId, repeats: int = 20) -> float:
    """Median CPU seconds to enter and leave :meth:`LayerStack.training` (merge + unmerge)."""
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        with stack.training(slot):
            pass
        times.append(time.thread_time() - start)
    return statistics.median(times)


def case(layer: str, blocks: int, steps: int) -> dict[str, Any]:
    """Bare PEFT, composed-merged and composed-live steps for training ``layer``'s slot."""
    policy = SimSettings().load_policy()
    base, tokenizer = load_base(policy.base_model)
    batch = _batch(tokenizer)
    merged_stack = _stack(policy, copy.deepcopy(base), tokenizer, merge=True)
    live_stack = _stack(policy, copy.deepcopy(base), tokenizer, merge=False)
    slot = next(s for s in slots_for_instance(policy, *INSTANCE) if s.layer == layer)
    bare = _bare(policy, merged_stack, slot, copy.deepcopy(base))
    merge_s = _merge_cost(merged_stack, slot)
    runs: dict[str, Trainer] = {"bare_peft": bare}
    contexts: dict[str, LayerStack] = {"composed_merged": merged_stack, "composed_live": live_stack}
    with merged_stack.training(slot), live_stack.training(slot):
        for name, stack in contexts.items():
            runs[name] = Trainer(stack.model, _groups(stack, slot), batch)
        for trainer in runs.values():
            trainer.model.train()
            trainer.block(3)  # warm-up
            trainer.wall.clear()
            trainer.cpu.clear()
        order: list[Callable[[int], None]] = [t.block for t in runs.values()]
        for b in range(blocks):
            for run in order[b % 3 :] + order[: b % 3]:  # rotate who goes first
                run(steps)
    med = {
        n: {"wall_s": statistics.median(t.wall), "cpu_s": statistics.median(t.cpu)}
        for n, t in runs.items()
    }
    anchor = med["bare_peft"]
    local_steps = policy.layer(layer).local.steps
    ours = med["composed_merged"]
    return {
        "trained_slot": str(slot),
        "composed_slots": [str(s) for s in merged_stack.active],
        "live_adapters_bare": 1,
        "memories_trained": len(merged_stack.spec(slot).memories),
        "median_step": med,
        "ratio_wall": ours["wall_s"] / anchor["wall_s"],
        "ratio_cpu": ours["cpu_s"] / anchor["cpu_s"],
        "ratio_live_wall": med["composed_live"]["wall_s"] / anchor["wall_s"],
        "ratio_live_cpu": med["composed_live"]["cpu_s"] / anchor["cpu_s"],
        "merge_unmerge_s": merge_s,
        "local_steps": local_steps,
        "ratio_call_cpu": (local_steps * ours["cpu_s"] + merge_s) / (local_steps * anchor["cpu_s"]),
        "blocks": blocks,
        "steps_per_block": steps,
        "batch_shape": list(batch["input_ids"].shape),
    }


def main() -> None:
    """Run both cases and write the JSON result."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the gym's clients; also the least noisy
    env = environment()
    cases = [case(layer, args.blocks, args.steps) for layer in ("individual", "creator")]
    env["load_avg_after"] = environment()["load_avg"]
    doc = {
        "benchmark": "client_step_composed_vs_bare_peft",
        "machine": {**env, "torch_threads": torch.get_num_threads()},
        "goal": f"<= {GOAL}",
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    for c in cases:
        print(
            f"{c['trained_slot']}: ratio cpu {c['ratio_cpu']:.3f} wall {c['ratio_wall']:.3f}"
            f" (live: cpu {c['ratio_live_cpu']:.3f}), merge+unmerge {c['merge_unmerge_s'] * 1e3:.2f} ms,"
            f" call {c['ratio_call_cpu']:.3f}"
        )
    print(f"{env['cpu']}, load {env['load_avg']} -> {env['load_avg_after']}")


if __name__ == "__main__":
    main()
