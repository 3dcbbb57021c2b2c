"""Batched composition probes on a local Llama folder score what the PEFT path scores.

The same check as ``tests/test_probe_batch.py`` on the deployment example's
``LlamaForCausalLM`` (rotary attention, RMS norms, SwiGLU, no tied weights) and its
JSONL suite with multi-token continuations; the individual layer targets only the
last decoder block, so compositions that differ there share the first block's input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from deploy_helpers import EXAMPLE, make_fleet

from layerfed.federation.probes import ProbeRunner
from layerfed.governance.signing import read_policy
from layerfed.layers.arrays import Arrays
from layerfed.layers.base import load_base
from layerfed.layers.probe_batch import BatchedProbes
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack


def test_llama_batched_margins_equal_one_composition_at_a_time(tmp_path: Path) -> None:
    """Six compositions of creator, community and per-instance slots: margins within 1e-4,
    rates identical, the same with lower blocks shared or not; the slots are large enough
    that the compositions' margins differ (the suite's six prompts keep rates at 0.5)."""
    data = yaml.safe_load((EXAMPLE / "policy.yaml").read_text(encoding="utf-8"))
    for layer in data["layers"]:
        if layer["name"] == "individual":
            layer["scope"]["include"] = ["model.layers.1.mlp.down_proj.weight"]
    fleet = make_fleet(tmp_path, {}, edit={"layers": data["layers"]})
    policy = read_policy(fleet.policy)
    model, tokenizer = load_base(policy.base_model, root=fleet.policy.parent)
    stack = LayerStack(policy, model, tokenizer, root_seed=5)
    runner = ProbeRunner(policy, stack, tokenizer, root=fleet.policy.parent, exact_margin=0.0)
    suites = [s.name for s in policy.probe_suites]
    suite_data = [runner.suite(n) for n in suites]

    rng = np.random.default_rng(7)

    def slot_arrays(slot: SlotId) -> Arrays:
        shapes = stack.spec(slot).shapes()
        return {n: rng.normal(0.0, 0.5, s).astype(np.float32) for n, s in shapes.items()}

    creator, community = SlotId("creator", "global"), SlotId("community", "global")
    shared = {creator: slot_arrays(creator), community: slot_arrays(community)}
    compositions: list[dict[SlotId, Arrays]] = [
        {**shared, SlotId("individual", f"i{k}"): slot_arrays(SlotId("individual", f"i{k}"))}
        for k in range(4)
    ]
    compositions.append(dict(shared))
    compositions.append({community: shared[community]})

    batched = runner.batch.margins(suite_data, compositions)
    rates = runner.measure_many(suites, compositions)
    unshared = BatchedProbes(stack, tokenizer)
    unshared.share_blocks = False
    apart = unshared.margins(suite_data, compositions)
    for composition, got, other, rate in zip(compositions, batched, apart, rates, strict=True):
        want = runner.margins_one(suite_data, composition)
        for g, o, w in zip(got, other, want, strict=True):
            assert torch.allclose(g, w, atol=1e-4, rtol=0), float((g - w).abs().max())
            assert torch.allclose(o, w, atol=1e-4, rtol=0), float((o - w).abs().max())
        assert rate == ProbeRunner._rates(suite_data, want)
    spread = max(float((b[0] - batched[-1][0]).abs().max()) for b in batched[:-1])
    assert spread > 0.05, spread  # the compositions are different models
