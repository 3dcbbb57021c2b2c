"""The wider gym base (``builtin: tiny-wide``, hidden size 256) and the exact basis on it.

Issue #23: on the 64-wide tiny base the red-line probes' activations span every targeted
module's whole input, so the exact basis leaves no capacity; the wide base is the same
recipe at hidden size 256. Guarantee checks use its architecture with random weights (as
``tests/test_protect.py`` does for the tiny one): pretraining it costs minutes of CPU.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from layerfed.governance.schema import Policy
from layerfed.layers.builtins import builtin_loader, builtin_names
from layerfed.layers.probes import load_suite
from layerfed.layers.protect import probe_rows
from layerfed.layers.slots import SlotId, slots_for_instance
from layerfed.layers.stack import LayerStack
from layerfed.simulation.tiny import (
    TINY_WIDTH,
    WIDE_WIDTH,
    build_tiny_model,
    build_tiny_tokenizer,
    tiny_config,
)
from layerfed.simulation.tiny_pretrain import (
    DEFAULT_RECIPE,
    WIDE2_RECIPE,
    WIDE_RECIPE,
    TinyRecipe,
    load_builtin_tiny_wide,
    load_builtin_tiny_wide2,
    recipe_key,
    trained_tiny_model,
)

DEFAULT = Path(__file__).resolve().parents[1] / "examples" / "policies" / "default.yaml"
TOL = 1e-3
"""Largest |logit - base logit| on a probe row with the exact basis (as tests/test_protect.py)."""


def test_the_wide_base_is_registered_and_only_wider() -> None:
    """``tiny-wide`` is a registered built-in; its config differs from tiny's in width only,
    and its cache key differs from tiny's, which stays keyed as before (width not in it)."""
    assert "tiny-wide" in builtin_names()
    assert builtin_loader("tiny-wide") is load_builtin_tiny_wide
    narrow, wide = tiny_config().to_dict(), tiny_config(width=WIDE_WIDTH).to_dict()
    assert (narrow["n_embd"], wide["n_embd"]) == (TINY_WIDTH, WIDE_WIDTH)
    differ = {k for k in narrow if narrow[k] != wide.get(k)}
    assert differ == {"n_embd"}, differ
    assert build_tiny_model(0, WIDE_WIDTH).transformer.h[0].mlp.c_proj.weight.shape == (1024, 256)
    assert recipe_key(0, WIDE_RECIPE) != recipe_key(0, DEFAULT_RECIPE)
    assert TinyRecipe(width=WIDE_WIDTH) == WIDE_RECIPE
    with pytest.raises(ValueError, match="width"):
        tiny_config(width=30)


def test_the_tuned_wide_base_is_registered_beside_the_first() -> None:
    """``tiny-wide2`` is a registered built-in of width 256 whose recipe differs from
    ``tiny-wide``'s in the optimiser schedule only, so it has its own cache key and
    ``tiny-wide``'s recipe (and key) stay as the earlier results used them."""
    assert {"tiny-wide", "tiny-wide2"} <= set(builtin_names())
    assert builtin_loader("tiny-wide2") is load_builtin_tiny_wide2
    assert WIDE2_RECIPE.width == WIDE_WIDTH and TinyRecipe(width=WIDE_WIDTH) == WIDE_RECIPE
    old, new = vars(WIDE_RECIPE), vars(WIDE2_RECIPE)
    assert {k for k in old if old[k] != new[k]} <= {"lr", "warmup", "steps", "batch_size"}
    assert recipe_key(0, WIDE2_RECIPE) not in {recipe_key(0, WIDE_RECIPE), recipe_key(0)}


def test_the_width_flows_through_pretraining_and_the_cache(tmp_path: Path) -> None:
    """A recipe's width is the trained model's and the cached file's: the second load reads
    that file back into a model of the same width with equal weights."""
    recipe = TinyRecipe(examples=120, steps=3, batch_size=8, warmup=1, width=32)
    first = trained_tiny_model(0, recipe, folder=tmp_path)
    again = trained_tiny_model(0, recipe, folder=tmp_path)
    assert first.config.n_embd == again.config.n_embd == 32
    assert len(list(tmp_path.glob("tiny-*.safetensors"))) == 1
    sa, sb = first.state_dict(), again.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _policy(folder: Path, protect: str) -> Policy:
    """The default policy with its red-line suite (builtin red_line_refusals) ``protect``ed."""
    data = copy.deepcopy(yaml.safe_load(DEFAULT.read_text(encoding="utf-8")))
    data["expires"] = "2030-01-01T00:00:00Z"
    data["base_model"] = {"builtin": "tiny-wide"}
    probe = {"suite": "red_line_refusals", "max_violation_rate": 0.01, "protect": protect}
    data["red_lines"]["probes"] = [probe]
    return Policy.model_validate(data).with_source_dir(folder)


@cache
def _wide(tmp: str, protect: str) -> tuple[LayerStack, list[SlotId]]:
    policy = _policy(Path(tmp), protect)
    stack = LayerStack(policy, build_tiny_model(0, WIDE_WIDTH), build_tiny_tokenizer(), root_seed=3)
    return stack, slots_for_instance(policy, "i1", "eu", ["g1"])


def _fill(stack: LayerStack, slots: list[SlotId], seed: int, norm: float) -> None:
    """Compose ``slots``, each with random B of Frobenius norm ``norm``."""
    rng = np.random.default_rng(seed)
    stack.activate(slots)
    for slot in slots:
        shapes = stack.spec(slot).shapes()
        arrays = {n: rng.normal(0.0, 1.0, s) for n, s in shapes.items()}
        total = float(np.sqrt(sum(float((a**2).sum()) for a in arrays.values())))
        stack.set_arrays(
            slot, {n: (a * norm / total).astype(np.float32) for n, a in arrays.items()}
        )


@torch.no_grad()
def _change(model: torch.nn.Module, base: torch.nn.Module, rows: list[tuple[int, ...]]) -> float:
    """Largest |logit - base logit| over every position of ``rows``, each row run alone."""
    worst = 0.0
    for r in rows:
        ids = torch.tensor([list(r)])
        diff = model(input_ids=ids).logits[0].float() - base(input_ids=ids).logits[0].float()
        worst = max(worst, float(diff.abs().max()))
    return worst


@pytest.mark.slow  # 1,160 probe positions on a 1,024-input module: minutes on a loaded CPU
def test_the_exact_basis_keeps_the_wide_base_probe_logits(tmp_path: Path) -> None:
    """Exact basis of the full red_line_refusals suite on the 256-wide architecture: every
    layer's slot composed with random B (norm 5) leaves the logits of every probe row at
    the base's within TOL; the same B with unprojected A moves them by more than 10 x TOL."""
    stack, slots = _wide(str(tmp_path / "exact"), "projection")
    plain, _ = _wide(str(tmp_path / "gate"), "gate")
    assert stack.protection is not None and plain.protection is None
    rows = probe_rows(stack.tokenizer, load_suite(stack.policy, "red_line_refusals"))
    base = build_tiny_model(0, WIDE_WIDTH)
    _fill(stack, slots, 7, 5.0)
    _fill(plain, slots, 7, 5.0)
    assert _change(stack.model, base, rows) <= TOL
    assert _change(plain.model, base, rows) > 10 * TOL
