"""Slots and their specs: which arrays a slot's update consists of, and its frozen A.

A slot is one adapter of a layer for one key. Its update is the LoRA B matrix
of every target module for every memory, named
``"{layer}/{key}/{memory}/{module}.lora_B"``. All memories of a slot share one
A per module, drawn from the slot's recorded seed, so the effective delta is
linear in B and averaging B across clients is exact. Everything here is pure
(numpy) so that the server never needs a PEFT model.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers.pytorch_utils import Conv1D

from layerfed.governance.schema import LayerPolicy, Policy
from layerfed.layers.aliases import alias_hit, in_scope_aliased, tied_parameters
from layerfed.layers.base import linear_modules
from layerfed.layers.errors import ArrayError, RedLineViolation, ScopeError, SlotError

if TYPE_CHECKING:
    from layerfed.layers.protect import Protection

__all__ = [
    "ArrayName",
    "SlotId",
    "SlotSpec",
    "Target",
    "check_arrays",
    "check_scopes",
    "check_stored_spec",
    "derive_a_seed",
    "layer_targets",
    "parse_array_name",
    "policy_layer",
    "slot_shapes",
    "slot_spec",
    "slots_for_instance",
]

KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
GLOBAL_KEY = "global"


@dataclass(frozen=True, order=True)
class SlotId:
    """One adapter of a layer: ``(layer, key)``, written ``"layer/key"``."""

    layer: str
    key: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.layer):
            raise SlotError(f"slot layer: expected a layer name like 'creator', got {self.layer!r}")
        if not KEY_PATTERN.fullmatch(self.key):
            raise SlotError(
                f"slot key of {self.layer!r}: expected letters, digits and '_.:@-' "
                f"(at most 128, no '/'), got {self.key!r}"
            )

    def __str__(self) -> str:
        return f"{self.layer}/{self.key}"

    @classmethod
    def parse(cls, text: str) -> SlotId:
        """The slot written as ``"layer/key"``."""
        layer, sep, key = text.partition("/")
        if not sep:
            raise SlotError(f"slot: expected 'layer/key', got {text!r}")
        return cls(layer, key)


@dataclass(frozen=True)
class ArrayName:
    """A parsed array name: slot, memory and the LoRA-targeted base module."""

    slot: SlotId
    memory: str
    module: str

    @property
    def parameter(self) -> str:
        """The base parameter this array changes."""
        return f"{self.module}.weight"

    def __str__(self) -> str:
        return f"{self.slot}/{self.memory}/{self.module}.lora_B"


def parse_array_name(name: str) -> ArrayName:
    """Split ``"layer/key/memory/module.lora_B"``; :class:`ArrayError` when malformed."""
    parts = name.split("/")
    if len(parts) != 4 or not parts[3].endswith(".lora_B") or not parts[2]:
        raise ArrayError(f"array name: expected 'layer/key/memory/module.lora_B', got {name!r}")
    return ArrayName(SlotId(parts[0], parts[1]), parts[2], parts[3].removesuffix(".lora_B"))


def slots_for_instance(
    policy: Policy, instance_id: str, jurisdiction: str | None, groups: Iterable[str]
) -> list[SlotId]:
    """The slots an instance composes, highest rank first (creator ... individual)."""
    keys: dict[str, list[str]] = {
        "global": [GLOBAL_KEY],
        "jurisdiction": [] if jurisdiction is None else [jurisdiction],
        "group": list(dict.fromkeys(groups)),
        "instance": [instance_id],
    }
    return [
        SlotId(layer.name, key) for layer in policy.layers_by_rank() for key in keys[layer.slot_key]
    ]


def derive_a_seed(root_seed: int, slot: SlotId) -> int:
    """The slot's A seed: a 63-bit integer derived from the root seed and the slot id."""
    digest = hashlib.sha256(f"layerfed/a-seed/{root_seed}/{slot}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


_PROJECTED_KEEP = 32
"""Projected A sets kept in memory (least recently drawn dropped first)."""
_PROJECTED: OrderedDict[tuple[Any, ...], dict[str, np.ndarray]] = OrderedDict()
_PROJECTED_LOCK = threading.Lock()


@dataclass(frozen=True)
class Target:
    """One LoRA-targeted base module and its weight's geometry."""

    module: str
    in_features: int
    out_features: int
    fan_in_fan_out: bool


@dataclass(frozen=True)
class SlotSpec:
    """Everything needed to rebuild a slot from its B arrays: seed, rank, targets, memories."""

    slot: SlotId
    a_seed: int
    rank: int
    alpha: float
    memories: tuple[str, ...]
    targets: tuple[Target, ...]
    basis_digest: str | None = None
    """The red-line projection basis A is projected with (:mod:`~layerfed.layers.protect`)."""
    protection: Protection | None = field(default=None, compare=False, repr=False)
    """The bases themselves (not recorded: rebuilt from the base and the suites)."""

    def with_protection(self, protection: Protection | None) -> SlotSpec:
        """This spec with A projected by ``protection`` (``None``: the seed's A as drawn)."""
        digest = None if protection is None else protection.digest
        return replace(self, basis_digest=digest, protection=protection)

    @property
    def scaling(self) -> float:
        """LoRA scaling ``alpha / rank``."""
        return self.alpha / self.rank

    def array_name(self, memory: str, module: str) -> str:
        """The name of one memory's B matrix for one module."""
        return f"{self.slot}/{memory}/{module}.lora_B"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Array name -> shape ``(out_features, rank)`` for every memory and target."""
        return {
            self.array_name(m, t.module): (t.out_features, self.rank)
            for m in self.memories
            for t in self.targets
        }

    def a_matrices(self) -> dict[str, np.ndarray]:
        """Module -> frozen A ``(rank, in_features)``, float32, uniform in ±1/sqrt(in).

        The one place a slot's A is made. With a basis digest, each A is projected off
        the red-line probes' activations (``A₀ (I - P)``) by the attached protection,
        which must be the recorded one. A projected A is computed once per slot recipe
        (seed, rank, targets, basis; the last :data:`_PROJECTED_KEEP` kept) and each
        call returns fresh copies, so the projection is paid when a slot is first drawn,
        not per round or per composition.
        """
        key: tuple[Any, ...] | None = None
        if self.basis_digest is not None:
            got = None if self.protection is None else self.protection.digest
            if self.protection is None or got != self.basis_digest:
                raise SlotError(
                    f"slot {self.slot}: expected the red-line projection basis "
                    f"{self.basis_digest} to draw A, got {got}"
                )
            key = (self.a_seed, self.rank, tuple(astuple(t) for t in self.targets), got)
            with _PROJECTED_LOCK:
                kept = _PROJECTED.get(key)
                if kept is not None:
                    _PROJECTED.move_to_end(key)
            if kept is not None:
                return {m: a.copy() for m, a in kept.items()}
        out: dict[str, np.ndarray] = {}
        for t in self.targets:
            tag = int.from_bytes(hashlib.sha256(t.module.encode()).digest()[:8], "big")
            rng = np.random.default_rng([self.a_seed, tag])
            bound = 1.0 / np.sqrt(t.in_features)
            out[t.module] = rng.uniform(-bound, bound, (self.rank, t.in_features)).astype(
                np.float32
            )
        if key is None or self.protection is None:
            return out
        projected = {m: self.protection.project(m, a) for m, a in out.items()}
        with _PROJECTED_LOCK:
            _PROJECTED[key] = projected
            while len(_PROJECTED) > _PROJECTED_KEEP:
                _PROJECTED.popitem(last=False)
        return {m: a.copy() for m, a in projected.items()}

    def summed_b(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Module -> sum of the memories' B: the single adapter the slot is equivalent to."""
        self.check(arrays)
        return {
            t.module: sum(
                (np.asarray(arrays[self.array_name(m, t.module)]) for m in self.memories),
                np.zeros((t.out_features, self.rank), np.float32),
            )
            for t in self.targets
        }

    def dense_delta(
        self, arrays: Mapping[str, np.ndarray], dtype: type[np.floating[Any]] = np.float32
    ) -> dict[str, np.ndarray]:
        """Base parameter -> effective delta ``scaling * B A`` in the weight's own layout."""
        a = self.a_matrices()
        out: dict[str, np.ndarray] = {}
        for t in self.targets:
            b = sum(np.asarray(arrays[self.array_name(m, t.module)], dtype) for m in self.memories)
            d = (np.asarray(b, dtype) @ a[t.module].astype(dtype)) * dtype(self.scaling)
            out[f"{t.module}.weight"] = d.T if t.fan_in_fan_out else d
        return out

    def check(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Raise :class:`ArrayError` unless ``arrays`` are exactly this slot's, finite."""
        check_arrays(self.shapes(), arrays, what=f"slot {self.slot}")

    def peft_config(self) -> dict[str, Any]:
        """The fields of a PEFT ``LoraConfig`` for this slot (one memory or their sum)."""
        return {
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": sorted(t.module for t in self.targets),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": any(t.fan_in_fan_out for t in self.targets),
            "task_type": "CAUSAL_LM",
        }

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the manifest's record of the slot)."""
        return {
            "slot": str(self.slot),
            "a_seed": self.a_seed,
            "rank": self.rank,
            "alpha": self.alpha,
            "memories": list(self.memories),
            "targets": [
                [t.module, t.in_features, t.out_features, t.fan_in_fan_out] for t in self.targets
            ],
            **({} if self.basis_digest is None else {"basis": self.basis_digest}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SlotSpec:
        """The spec :meth:`to_json` wrote; KeyError/TypeError/ValueError when malformed."""
        return cls(
            slot=SlotId.parse(str(data["slot"])),
            a_seed=int(data["a_seed"]),
            rank=int(data["rank"]),
            alpha=float(data["alpha"]),
            memories=tuple(str(m) for m in data["memories"]),
            targets=tuple(
                Target(str(m), int(i), int(o), bool(f)) for m, i, o, f in data["targets"]
            ),
            basis_digest=None if data.get("basis") is None else str(data["basis"]),
        )


def check_arrays(
    shapes: Mapping[str, tuple[int, ...]], arrays: Mapping[str, np.ndarray], *, what: str
) -> None:
    """Raise :class:`ArrayError` unless ``arrays`` has exactly ``shapes``' names, shapes, finite."""
    missing = sorted(set(shapes) - set(arrays))
    extra = sorted(set(arrays) - set(shapes))
    if missing or extra:
        raise ArrayError(
            f"{what}: expected arrays {sorted(shapes)}, got missing {missing}, unexpected {extra}"
        )
    for name, shape in shapes.items():
        got = np.shape(arrays[name])
        if got != shape:
            raise ArrayError(f"{what}: array {name!r}: expected shape {shape}, got {got}")
        if not np.all(np.isfinite(arrays[name])):
            raise ArrayError(f"{what}: array {name!r}: expected finite values, got NaN or inf")


def layer_targets(
    layer: LayerPolicy, red_lines: Sequence[str], model: torch.nn.Module
) -> list[Target]:
    """The modules whose ``.weight`` is in the layer's scope; red-line weights refused.

    Both resolve over tied parameters (:mod:`~layerfed.layers.aliases`): a weight
    sharing storage with a red-line or excluded parameter is protected like it.
    """
    out: list[Target] = []
    aliases = tied_parameters(model)
    for name, module in linear_modules(model).items():
        param = f"{name}.weight"
        if not in_scope_aliased(param, layer.scope.include, layer.scope.exclude, aliases):
            continue
        hit = alias_hit(param, red_lines, aliases)
        if hit is not None:
            tied = "" if hit == param else f" (tied to red-line parameter {hit!r})"
            raise RedLineViolation(
                f"layer {layer.name!r} scope: expected no red-line parameter, got {param!r}{tied}"
            )
        fifo = isinstance(module, Conv1D)
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        rows, cols = weight.shape
        out.append(Target(name, *((rows, cols) if fifo else (cols, rows)), fan_in_fan_out=fifo))
    if not out:
        raise ScopeError(
            f"layer {layer.name!r} scope: expected at least one Linear/Conv1D weight of the "
            f"base model matching include {list(layer.scope.include)} minus exclude "
            f"{list(layer.scope.exclude)}, got none"
        )
    return out


def check_scopes(policy: Policy, model: torch.nn.Module) -> None:
    """Raise :class:`ScopeError` (or :class:`RedLineViolation`) for the first layer whose
    scope resolves to no weight of ``model`` (or to a red-line one); servers call it at start."""
    for layer in policy.layers:
        layer_targets(layer, policy.red_lines.parameters, model)


def slot_spec(
    policy: Policy,
    base_model: torch.nn.Module,
    slot: SlotId,
    root_seed: int = 0,
    protection: Protection | None = None,
) -> SlotSpec:
    """The spec of ``slot`` under ``policy`` on ``base_model`` (A projected by ``protection``)."""
    layer = policy_layer(policy, slot)
    targets = layer_targets(layer, policy.red_lines.parameters, base_model)
    return SlotSpec(
        slot=slot,
        a_seed=derive_a_seed(root_seed, slot),
        rank=layer.scope.lora_rank,
        alpha=layer.scope.lora_alpha,
        memories=tuple(m.name for m in layer.memories),
        targets=tuple(targets),
    ).with_protection(protection)


def check_stored_spec(stored: SlotSpec, expected: SlotSpec, *, where: str) -> None:
    """Raise :class:`SlotError` unless a stored slot's A recipe (seed, basis, rank, targets)
    is the one this policy and base draw: a slot or resume with another A is refused."""
    for name in ("a_seed", "basis_digest", "rank", "targets"):
        got, want = getattr(stored, name), getattr(expected, name)
        if got != want:
            raise SlotError(
                f"{where}: slot {expected.slot}: expected {name} {want!r} (this policy's A), "
                f"got {got!r}"
            )


def slot_shapes(
    policy: Policy, base_model: torch.nn.Module, slot: SlotId
) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the arrays an update of ``slot`` consists of."""
    return slot_spec(policy, base_model, slot).shapes()


def policy_layer(policy: Policy, slot: SlotId) -> LayerPolicy:
    """The policy's layer for ``slot``; :class:`SlotError` when the policy has none."""
    try:
        return policy.layer(slot.layer)
    except KeyError:
        names = [layer.name for layer in policy.layers]
        raise SlotError(f"slot {slot}: expected a layer in {names}, got {slot.layer!r}") from None
