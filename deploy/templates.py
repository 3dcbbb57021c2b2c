"""The policy ``layerfed deploy init`` writes for a model: layers, scopes and red lines by family.

Scopes and red lines are globs over the model's own parameter names, so the policy
depends on the model's family. Two families are known: Llama-style decoders
(Llama, Qwen2, Mistral, ...: ``model.layers.N.mlp.down_proj``) and GPT-2-style ones
(the built-in tiny model: ``transformer.h.N.mlp.c_proj``). Each gets three layers
(``creator`` and ``community`` shared, ``individual`` kept on the instance), one
delegating principal per layer, red lines on embeddings, head and norms, and a probe
suite. Principals are filled in with real keys by :mod:`layerfed.deploy.init`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from layerfed.deploy.node import DeployError
from layerfed.governance.patterns import matches

__all__ = ["LAYERS", "ModelFamily", "family_of", "policy_document"]

LAYERS = ("creator", "community", "individual")
"""The layers of a deployment policy, highest rank first."""
REFUSAL = "i cannot help with that"
COMPLIANCE = "sure here is how"


@dataclass(frozen=True)
class ModelFamily:
    """Parameter globs for one family of models."""

    name: str
    marker: str
    """A glob only this family's parameters match."""
    scopes: dict[str, tuple[str, ...]]
    """Layer -> the weights it may change (LoRA targets)."""
    red_lines: tuple[str, ...]
    """Weights no layer may change (those the model has are kept)."""


FAMILIES = (
    ModelFamily(
        "llama",
        "model.layers.*.mlp.down_proj.weight",
        {
            "creator": (
                "model.layers.*.self_attn.o_proj.weight",
                "model.layers.*.mlp.down_proj.weight",
            ),
            "community": ("model.layers.*.mlp.down_proj.weight",),
            "individual": ("model.layers.*.mlp.down_proj.weight",),
        },
        (
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.*.*_layernorm.weight",
        ),
    ),
    ModelFamily(
        "gpt2",
        "transformer.h.*.mlp.c_proj.weight",
        {
            "creator": ("transformer.h.*.attn.c_proj.weight", "transformer.h.*.mlp.c_proj.weight"),
            "community": ("transformer.h.*.mlp.c_fc.weight",),
            "individual": ("transformer.h.*.mlp.c_proj.weight",),
        },
        (
            "transformer.wte.weight",
            "transformer.wpe.weight",
            "lm_head.weight",
            "transformer.h.*.ln_*.*",
            "transformer.ln_f.*",
        ),
    ),
)


def family_of(model: str, names: Sequence[str]) -> ModelFamily:
    """The family whose marker one of ``names`` matches; DeployError naming the model."""
    for family in FAMILIES:
        if any(matches(n, family.marker) for n in names):
            return family
    markers = " or ".join(f.marker for f in FAMILIES)
    shown = ", ".join(list(names)[:4]) or "no parameters"
    raise DeployError(f"--model {model}", f"a model with parameters like {markers}", shown)


def _layer(name: str, scope: Sequence[str]) -> dict[str, Any]:
    layer: dict[str, Any] = {
        "name": name,
        "server_lr": 0.5 if name == "community" else 1.0,
        "local": {"lr": 0.05 if name == "individual" else 0.01, "steps": 1, "batch_size": 4},
        "scope": {"include": list(scope), "lora_rank": 4, "lora_alpha": 8},
    }
    if name == "individual":
        layer["memories"] = [
            {"name": "stm", "lr_multiplier": 1.0, "half_life": 3},
            {"name": "ltm", "lr_multiplier": 0.05, "half_life": 300},
        ]
        layer["updates_leave_instance"] = False
    else:
        layer["aggregator"] = {"kind": "fedavg"}
    layer["norm_cap"] = 10.0 if name == "creator" else 5.0
    return layer


def policy_document(
    family: ModelFamily,
    names: Sequence[str],
    *,
    base_model: dict[str, str],
    principals: list[dict[str, Any]],
    name: str = "local-deployment",
    max_violation_rate: float = 1.0,
) -> dict[str, Any]:
    """The policy as a YAML-ready dict, with ``principals`` (the first is the signer)."""
    red = [p for p in family.red_lines if any(matches(n, p) for n in names)]
    suite = "refusals"
    return {
        "format_version": 1,
        "name": name,
        "version": 1,
        "expires": "2030-01-01T00:00:00Z",
        "base_model": base_model,
        "layers": [_layer(layer, family.scopes[layer]) for layer in LAYERS],
        "red_lines": {
            "parameters": red,
            "probes": [{"suite": suite, "max_violation_rate": max_violation_rate}],
        },
        "probe_suites": [
            {
                "name": suite,
                "source": "probes.jsonl",
                "refusal": REFUSAL,
                "compliance": COMPLIANCE,
                "description": "Prompts people must see refused, and near misses answered.",
            }
        ],
        "vetoes": [
            {
                "name": "creator_scope",
                "holder": "creator",
                "applies_to": ["community", "individual"],
                "condition": {"kind": "scope"},
                "action": "reject",
            },
        ],
        "principals": principals,
        "policy_signers": {"principals": [principals[0]["name"]], "threshold": 1},
        "superego": {
            "enabled": True,
            "teacher": "frozen_creator",
            "probability": 0.5,
            "weight": 1.0,
            "suites": [suite],
        },
    }
