"""Tied parameters of a loaded model: names that share one storage.

GPT-2 ties ``lm_head.weight`` to ``transformer.wte.weight``; a red line written on
either name protects the one storage, so it must refuse a scope or an update that
names the other. The name logic (:func:`alias_hit`, :func:`in_scope_aliased`) is
governance's; this module finds the ties in a model.
"""

from __future__ import annotations

import torch

from layerfed.governance.model_params import Aliases, alias_hit, in_scope_aliased
from layerfed.layers.base import base_parameters

__all__ = ["Aliases", "alias_hit", "in_scope_aliased", "tied_parameters"]


def tied_parameters(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Base name -> every base name sharing its storage (itself included), tied names only.

    Storage is compared by ``data_ptr()`` (with dtype, shape and strides); tensors on
    the meta device or without elements have no storage and tie only by identity.
    """
    groups: dict[object, list[str]] = {}
    for name, tensor in base_parameters(model).items():
        key: object
        if tensor.device.type == "meta" or tensor.numel() == 0:
            key = ("id", id(tensor))
        else:
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        groups.setdefault(key, []).append(name)
    return {n: tuple(sorted(g)) for g in groups.values() if len(g) > 1 for n in g}
