"""One slot's training at the cost of one bare LoRA adapter, undone exactly afterwards.

:meth:`~layerfed.layers.LayerStack.training` uses a :class:`TrainingMerge` to

- **merge** every frozen adapter's dense delta ``scaling * B A`` into the base
  weight it targets (a float32 snapshot of each touched weight is kept);
- **fold** the trained slot's memories into one live adapter: they share A, so
  the forward pass only sees ``sum B`` and every memory gets the same gradient;
  an optimizer whose step is ``lr`` times a function of the gradients (Adam, SGD
  without weight decay) then moves memory ``m`` by ``lr_m / sum lr`` of the sum's
  step, which is how the fold is undone;
- **unwrap** LoRA layers left with no live adapter (the base module takes their
  place in the model, so they cost nothing in the forward pass).

:meth:`TrainingMerge.restore` undoes all three: base weights are copied back
bit for bit, the memories get their shares of the step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["TrainingMerge"]


@dataclass
class _Fold:
    """Memories folded into ``names[0]``: their B before, and each one's share of the step."""

    names: list[str]
    shares: list[float]
    before: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class TrainingMerge:
    """The undo record of one training call on a PEFT LoRA model.

    ``layers`` maps base module names to their PEFT LoRA layers; ``model`` is the
    module they live in (for unwrapping).
    """

    def __init__(self, model: torch.nn.Module, layers: Mapping[str, Any]) -> None:
        self.model = model
        self.layers = dict(layers)
        self.saved: dict[str, torch.Tensor] = {}
        self.merged: set[str] = set()
        self.folded: _Fold | None = None
        self.unwrapped: dict[str, Any] = {}

    def merge(self, name: str, modules: Sequence[str]) -> None:
        """Add adapter ``name``'s delta on ``modules`` to their base weights (snapshots first)."""
        with torch.no_grad():
            for module in modules:
                layer = self.layers[module]
                weight = layer.get_base_layer().weight
                if module not in self.saved:
                    self.saved[module] = weight.detach().clone()
                weight.add_(layer.get_delta_weight(name))
        self.merged.add(name)

    def fold(
        self, names: Sequence[str], multipliers: Sequence[float], modules: Sequence[str]
    ) -> str:
        """Put the sum of the memories' B into ``names[0]`` (which stays live); returns it."""
        total = float(sum(multipliers))
        fold = _Fold(list(names), [m / total for m in multipliers])
        with torch.no_grad():
            for name in names:
                fold.before[name] = {
                    m: self.layers[m].lora_B[name].weight.detach().clone() for m in modules
                }
            for m in modules:
                summed = torch.stack([fold.before[n][m] for n in names]).sum(0)
                self.layers[m].lora_B[names[0]].weight.copy_(summed)
        self.folded = fold
        return fold.names[0]

    def current_b(self, name: str, module: str) -> torch.Tensor:
        """Adapter ``name``'s B on ``module`` as it would be after :meth:`restore` now."""
        weight: torch.Tensor = self.layers[module].lora_B[name].weight.detach()
        fold = self.folded
        if fold is None or name not in fold.names:
            return weight.clone()
        summed: torch.Tensor = self.layers[module].lora_B[fold.names[0]].weight.detach()
        step = summed - torch.stack([fold.before[n][module] for n in fold.names]).sum(0)
        share = fold.shares[fold.names.index(name)]
        out: torch.Tensor = fold.before[name][module] + share * step
        return out

    def live(self, names: list[str]) -> None:
        """Only ``names`` in the forward pass; LoRA layers with none of them leave the model."""
        for layer in self.layers.values():
            layer.set_adapter(names, inference_mode=True)
        wanted = set(names)
        for module, layer in self.layers.items():
            if wanted.isdisjoint(layer.lora_B.keys()):
                self._swap(module, layer.get_base_layer())
                self.unwrapped[module] = layer

    def restore(self, names: list[str]) -> None:
        """Undo everything: LoRA layers back, base weights copied back, memories unfolded."""
        for module, layer in self.unwrapped.items():
            self._swap(module, layer)
        self.unwrapped = {}
        with torch.no_grad():
            for module, weight in self.saved.items():
                self.layers[module].get_base_layer().weight.copy_(weight)
            if self.folded is not None:
                fold = self.folded
                modules = list(fold.before[fold.names[0]])
                after = {n: {m: self.current_b(n, m) for m in modules} for n in fold.names}
                for n, per_module in after.items():
                    for m, value in per_module.items():
                        self.layers[m].lora_B[n].weight.copy_(value)
        self.saved, self.merged, self.folded = {}, set(), None
        for layer in self.layers.values():
            layer.set_adapter(names, inference_mode=True)

    def _swap(self, module: str, new: torch.nn.Module) -> None:
        parent_name, _, child = module.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)
