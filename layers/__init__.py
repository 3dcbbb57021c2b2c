"""The layer stack on PEFT: slots, scopes, memories, red lines, the slot store, base models."""

from __future__ import annotations

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
