"""The layer stack on PEFT: slots, scopes, memories, red lines, the slot store, base models.

Names load on first use, so ``import layerfed.layers.params`` (the CLI, policy checks)
does not import torch, transformers and PEFT until a name that needs them is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfed._lazy import lazy_getattr

if TYPE_CHECKING:
    from layerfed.layers.base import base_parameters, linear_modules, load_base
    from layerfed.layers.errors import (
        ArrayError,
        BaseModelError,
        DecayError,
        LayerError,
        RedLineViolation,
        ScopeError,
        SlotError,
        SlotStoreError,
    )
    from layerfed.layers.memory import apply_update, decay_arrays, decay_factor
    from layerfed.layers.redlines import check_update_names, redline_digest, verify_redlines
    from layerfed.layers.slots import (
        SlotId,
        SlotSpec,
        Target,
        derive_a_seed,
        parse_array_name,
        slot_shapes,
        slot_spec,
        slots_for_instance,
    )
    from layerfed.layers.stack import LayerStack, adapter_name
    from layerfed.layers.store import SlotStore

__all__ = [
    "ArrayError",
    "BaseModelError",
    "DecayError",
    "LayerError",
    "LayerStack",
    "RedLineViolation",
    "ScopeError",
    "SlotError",
    "SlotId",
    "SlotSpec",
    "SlotStore",
    "SlotStoreError",
    "Target",
    "adapter_name",
    "apply_update",
    "base_parameters",
    "check_update_names",
    "decay_arrays",
    "decay_factor",
    "derive_a_seed",
    "linear_modules",
    "load_base",
    "parse_array_name",
    "redline_digest",
    "slot_shapes",
    "slot_spec",
    "slots_for_instance",
    "verify_redlines",
]

_HOMES: dict[str, str] = {
    "ArrayError": "layerfed.layers.errors",
    "BaseModelError": "layerfed.layers.errors",
    "DecayError": "layerfed.layers.errors",
    "LayerError": "layerfed.layers.errors",
    "LayerStack": "layerfed.layers.stack",
    "RedLineViolation": "layerfed.layers.errors",
    "ScopeError": "layerfed.layers.errors",
    "SlotError": "layerfed.layers.errors",
    "SlotId": "layerfed.layers.slots",
    "SlotSpec": "layerfed.layers.slots",
    "SlotStore": "layerfed.layers.store",
    "SlotStoreError": "layerfed.layers.errors",
    "Target": "layerfed.layers.slots",
    "adapter_name": "layerfed.layers.stack",
    "apply_update": "layerfed.layers.memory",
    "base_parameters": "layerfed.layers.base",
    "check_update_names": "layerfed.layers.redlines",
    "decay_arrays": "layerfed.layers.memory",
    "decay_factor": "layerfed.layers.memory",
    "derive_a_seed": "layerfed.layers.slots",
    "linear_modules": "layerfed.layers.base",
    "load_base": "layerfed.layers.base",
    "parse_array_name": "layerfed.layers.slots",
    "redline_digest": "layerfed.layers.redlines",
    "slot_shapes": "layerfed.layers.slots",
    "slot_spec": "layerfed.layers.slots",
    "slots_for_instance": "layerfed.layers.slots",
    "verify_redlines": "layerfed.layers.redlines",
}
"""Where each public name lives."""


__getattr__ = lazy_getattr("layerfed.layers", _HOMES, globals())
