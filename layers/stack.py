"""The layer stack: a frozen base plus one LoRA adapter per slot memory, on PEFT.

Each memory of a slot is its own PEFT LoRA adapter; all memories of a slot share
the slot's frozen A (drawn from its recorded seed) and only B trains. An
instance's model activates all its slots at once; exactly one slot (or one
memory of it) is trainable at a time. Every commit re-checks the red lines.

While a slot trains (:meth:`LayerStack.training`), the frozen adapters are merged
into the base weights, so a step costs what a bare single-adapter PEFT step costs;
the base weights are restored bit for bit afterwards (from float32 copies).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedTokenizerBase

from layerfed.governance.schema import Policy
from layerfed.layers.aliases import tied_parameters
from layerfed.layers.base import base_parameters, peft_wrapping, unwrap
from layerfed.layers.errors import SlotError
from layerfed.layers.memory import decay_arrays
from layerfed.layers.merge import TrainingMerge
from layerfed.layers.protect import protection_for
from layerfed.layers.redlines import check_update_names, redline_digest, verify_redlines
from layerfed.layers.slots import SlotId, SlotSpec, policy_layer, slot_spec

__all__ = ["LayerStack", "adapter_name"]

log = logging.getLogger("layerfed")


def adapter_name(slot: SlotId, memory: str) -> str:
    """The PEFT adapter name of one memory of a slot (no dots; hashed when sanitised)."""
    safe = re.sub(r"[^A-Za-z0-9_]", "_", slot.key)
    if safe != slot.key:
        safe += "_" + hashlib.sha256(slot.key.encode()).hexdigest()[:8]
    return f"{slot.layer}__{safe}__{memory}"


class LayerStack:
    """A policy turned into a model: frozen base + LoRA slots, composed per instance.

    The stack wraps ``base_model`` in place (PEFT injects its LoRA layers) and owns
    it from then on. ``expected_redline_digest`` (e.g. from a manifest) is checked
    on construction; the digest is checked again after every commit.
    """

    def __init__(
        self,
        policy: Policy,
        base_model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase | None = None,
        root_seed: int = 0,
        *,
        expected_redline_digest: str | None = None,
    ) -> None:
        self.policy = policy
        self.tokenizer = tokenizer
        self.root_seed = root_seed
        self._base = base_model
        self._base.requires_grad_(False)
        self._peft: PeftModel | None = None
        self._specs: dict[SlotId, SlotSpec] = {}
        self._active: list[SlotId] = []
        self._trainable: tuple[SlotId, str | None] | None = None
        self._host: dict[SlotId, SlotId] = {}
        self._free: dict[str, list[SlotId]] = {}
        self._patterns = list(policy.red_lines.parameters)
        self._tied = set(tied_parameters(base_model))
        self._merge: TrainingMerge | None = None
        """While a slot trains: merged, folded and unwrapped adapters, to undo on exit."""
        self._layer_cache: dict[str, Any] | None = None
        self.merge_frozen = True
        """Merge frozen slots into the base while one trains (False: every adapter stays live)."""
        self.redline_digest = redline_digest(base_model, self._patterns)
        if expected_redline_digest is not None:
            verify_redlines(base_model, self._patterns, expected_redline_digest)
        self.protection = protection_for(policy, base_model, tokenizer)
        """Bases every slot's A is projected with (red-line suites with ``protect``
        ``projection``/``both``), computed from the frozen base before any adapter; or None."""

    # -- introspection -------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        """The model to run: the PEFT model once a slot exists, else the bare base."""
        return self._base if self._peft is None else self._peft

    @property
    def active(self) -> list[SlotId]:
        """The slots composed into the forward pass, in composition order."""
        return list(self._active)

    @property
    def slots(self) -> list[SlotId]:
        """Every slot that has adapters in memory."""
        return sorted(self._specs)

    def spec(self, slot: SlotId) -> SlotSpec:
        """The slot's spec (targets, A seed, rank, memories), computed on first use."""
        if slot not in self._specs:
            return slot_spec(self.policy, self._base, slot, self.root_seed, self.protection)
        return self._specs[slot]

    def a_seed(self, slot: SlotId) -> int:
        """The seed the slot's frozen A matrices are drawn from."""
        return self.spec(slot).a_seed

    # -- composition ----------------------------------------------------------------

    def activate(self, slots: Iterable[SlotId]) -> None:
        """Compose exactly ``slots`` (creating missing ones with zero B); nothing trainable."""
        self._require_unmerged("activate")
        wanted = list(dict.fromkeys(slots))
        if not wanted:
            raise SlotError("activate: expected at least one slot, got none")
        specs = {s: self.spec(s) for s in wanted}  # every check before any change
        for slot, spec in specs.items():
            if slot not in self._specs:
                self._create(spec)
        names = [self._adapter(s, m) for s in wanted for m in specs[s].memories]
        self._set_adapters(names)
        self._active = wanted
        self._freeze_all()
        log.debug("activated slots %s", [str(s) for s in wanted])

    def _create(self, spec: SlotSpec) -> None:
        spare = self._free.get(spec.slot.layer)
        if spare:
            self._host[spec.slot] = spare.pop()
            self._specs[spec.slot] = spec
            self._reset(spec)
            return
        host = spec.slot
        if host in self._host.values():  # its own name hosts another slot: take a fresh one
            host = SlotId(spec.slot.layer, f"pool-{len(self._host) + len(self._specs)}")
            while host in self._host.values() or host in self._specs:
                host = SlotId(spec.slot.layer, host.key + "x")
            self._host[spec.slot] = host
        config = LoraConfig(**spec.peft_config())
        for memory in spec.memories:
            name = adapter_name(host, memory)
            if self._peft is None:
                with peft_wrapping():  # PEFT reads a property transformers 5 deprecated
                    self._peft = get_peft_model(self._base, config, adapter_name=name)
            else:
                self._peft.add_adapter(name, config)
        self._layer_cache = None
        self._specs[spec.slot] = spec
        self._reset(spec)

    def _reset(self, spec: SlotSpec) -> None:
        """Write the slot's frozen A (from its seed) and a zero B into its adapters."""
        a = spec.a_matrices()
        with torch.no_grad():
            for memory in spec.memories:
                name = self._adapter(spec.slot, memory)
                for module, layer in self._lora_layers(spec.slot, memory).items():
                    layer.lora_A[name].float()  # slots stay float32 on any base dtype
                    layer.lora_B[name].float()
                    layer.lora_A[name].weight.copy_(torch.from_numpy(a[module]))
                    layer.lora_B[name].weight.zero_()

    def evict(self, slot: SlotId, *, recycle: bool = False) -> dict[str, np.ndarray]:
        """Drop an inactive slot from memory; returns its arrays to persist.

        With ``recycle`` its adapters are kept as a spare for the next new slot of the
        same layer (A rewritten from that slot's seed, B zeroed): many instances' slots
        then cost one set of adapters and no PEFT re-injection.
        """
        self._require_unmerged("evict")
        if slot in self._active:
            raise SlotError(f"evict {slot}: expected an inactive slot, got an active one")
        arrays = self.get_arrays(slot)
        assert self._peft is not None
        host = self._host.pop(slot, slot)
        if recycle:
            self._free.setdefault(slot.layer, []).append(host)
        else:
            for memory in self._specs[slot].memories:
                self._peft.delete_adapter(adapter_name(host, memory))
        del self._specs[slot]
        self._set_adapters(
            [self._adapter(s, m) for s in self._active for m in self._specs[s].memories]
        )
        self._freeze_all()
        return arrays

    # -- training -------------------------------------------------------------------

    def set_trainable(self, slot: SlotId, memory: str | None = None) -> None:
        """Make exactly ``slot``'s B matrices (all memories, or just ``memory``) trainable."""
        spec = self._require_active(slot)
        if memory is not None and memory not in spec.memories:
            raise SlotError(f"slot {slot}: expected a memory in {spec.memories}, got {memory!r}")
        self._freeze_all()
        for m in spec.memories if memory is None else (memory,):
            for p in self._b_params(slot, m).values():
                p.requires_grad_(True)
        self._trainable = (slot, memory)

    @contextmanager
    def training(self, slot: SlotId, memory: str | None = None) -> Iterator[None]:
        """Train ``slot`` (or one memory) at the cost of one bare LoRA adapter.

        Inside, the other active adapters are merged into the base weights, the
        slot's memories are folded into one live adapter (:meth:`memory_lrs` then
        gives one group at the summed rate) and LoRA layers with no live adapter
        leave the forward pass (:mod:`layerfed.layers.merge`). A slot on a tied
        weight stays live (merging would change the tied parameter too). On exit
        the base weights are copied back bit for bit, each memory gets its share
        of the step, every active adapter is live again and nothing is trainable.
        """
        self.set_trainable(slot, memory)
        trained = self._specs[slot].memories if memory is None else (memory,)
        try:
            if self.merge_frozen:
                self._merge = self._start_merge(slot, trained)
                for p in self._b_params(slot, trained[0]).values():  # the folded memories' sum
                    p.requires_grad_(True)
            yield
        finally:
            if self._merge is not None:
                self._merge.restore(self._active_names())  # every LoRA weight frozen again
                self._tuner().active_adapter = self._active_names()
                self._merge = None
                self._trainable = None
            else:
                self._freeze_all()

    def _start_merge(self, slot: SlotId, trained: tuple[str, ...]) -> TrainingMerge:
        merge = TrainingMerge(unwrap(self.model), self._layers())
        self._merge = merge
        live = [self._adapter(slot, m) for m in trained]
        for other in self._active:
            spec = self._specs[other]
            if any(f"{t.module}.weight" in self._tied for t in spec.targets):
                live += [self._adapter(other, m) for m in spec.memories]
                continue
            for m in spec.memories:
                name = self._adapter(other, m)
                if name not in live:
                    merge.merge(name, list(self._lora_layers(other, m)))
        if len(trained) > 1:
            mult = {m.name: m.lr_multiplier for m in policy_layer(self.policy, slot).memories}
            modules = list(self._lora_layers(slot, trained[0]))
            folded = merge.fold(live[: len(trained)], [mult[m] for m in trained], modules)
            live = [folded, *live[len(trained) :]]
        merge.live(live)
        self._tuner().active_adapter = live
        log.debug("training %s: %s adapters merged, live %s", slot, len(merge.merged), live)
        return merge

    def _active_names(self) -> list[str]:
        return [self._adapter(s, m) for s in self._active for m in self._specs[s].memories]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters that currently require gradients."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def memory_lrs(self, slot: SlotId) -> list[tuple[list[torch.nn.Parameter], float]]:
        """``(B params, lr multiplier)`` per memory, for optimizer param groups."""
        spec = self._require(slot)
        layer = policy_layer(self.policy, slot)
        mult = {m.name: m.lr_multiplier for m in layer.memories}
        merge = self._merge
        if merge is not None and merge.folded is not None and self._trainable == (slot, None):
            total = sum(mult[m] for m in spec.memories)  # folded: one adapter, the summed rate
            return [(list(self._b_params(slot, spec.memories[0]).values()), total)]
        return [(list(self._b_params(slot, m).values()), mult[m]) for m in spec.memories]

    # -- arrays -----------------------------------------------------------------------

    def get_arrays(self, slot: SlotId) -> dict[str, np.ndarray]:
        """The slot's B matrices by array name (copies, float32)."""
        spec = self._require(slot)
        merge = self._merge
        return {
            spec.array_name(m, module): (
                merge.current_b(self._adapter(slot, m), module) if merge else p.detach()
            )
            .cpu()
            .numpy()
            .copy()
            for m in spec.memories
            for module, p in self._b_params(slot, m).items()
        }

    def set_arrays(self, slot: SlotId, arrays: Mapping[str, np.ndarray]) -> None:
        """Commit a full set of the slot's B arrays (checked first), then re-check red lines."""
        spec = self._require(slot)
        check_update_names(self.policy, arrays)
        spec.check(arrays)
        self._write(slot, arrays)

    def _write(self, slot: SlotId, arrays: Mapping[str, np.ndarray]) -> None:
        spec = self._specs[slot]
        if self._merge is not None and slot in self._active:
            raise SlotError(f"slot {slot}: expected a live slot, got one merged for training")
        with torch.no_grad():
            for m in spec.memories:
                for module, p in self._b_params(slot, m).items():
                    value = np.asarray(arrays[spec.array_name(m, module)], np.float32)
                    p.copy_(torch.from_numpy(value))
        self.verify_redlines()

    def decay(self, slot: SlotId, *, rounds: float = 0, seconds: float = 0.0) -> None:
        """Multiply each memory's B by ``2 ** (-elapsed / half_life)``."""
        layer = policy_layer(self.policy, slot)
        self._write(
            slot, decay_arrays(self.get_arrays(slot), layer, rounds=rounds, seconds=seconds)
        )

    def verify_redlines(self) -> None:
        """Raise :class:`RedLineViolation` if a red-line parameter changed since construction."""
        verify_redlines(self.model, self._patterns, self.redline_digest)

    # -- dense views ------------------------------------------------------------------

    def delta(self, slot: SlotId) -> dict[str, torch.Tensor]:
        """Base parameter -> the slot's effective dense delta (sum over its memories)."""
        self._require_unmerged("delta")
        spec = self._require(slot)
        out: dict[str, torch.Tensor] = {}
        for m in spec.memories:
            for module, layer in self._lora_layers(slot, m).items():
                d = layer.get_delta_weight(self._adapter(slot, m)).detach()
                key = f"{module}.weight"
                out[key] = out[key] + d if key in out else d.clone()
        return out

    def effective_parameters(self) -> dict[str, torch.Tensor]:
        """Base parameters plus the deltas of the active slots (what the forward pass uses)."""
        self._require_unmerged("effective_parameters")
        out = {n: t.detach().clone() for n, t in base_parameters(self.model).items()}
        for slot in self._active:
            for name, d in self.delta(slot).items():
                out[name] += d
        return out

    # -- internals --------------------------------------------------------------------

    def _require(self, slot: SlotId) -> SlotSpec:
        if slot not in self._specs:
            raise SlotError(f"slot {slot}: expected a slot in the stack {self.slots}, got none")
        return self._specs[slot]

    def _require_active(self, slot: SlotId) -> SlotSpec:
        spec = self._require(slot)
        if slot not in self._active:
            raise SlotError(f"slot {slot}: expected an active slot {self.active}, got inactive")
        return spec

    def _require_unmerged(self, what: str) -> None:
        if self._merge is not None:
            raise SlotError(f"{what}: expected no slot in training, got merged frozen slots")

    def _freeze_all(self) -> None:
        self.model.requires_grad_(False)
        self._trainable = None

    def _tuner(self) -> Any:
        if self._peft is None:
            raise SlotError("activate: expected a slot with adapters, got none")
        return self._peft.base_model

    def _set_adapters(self, names: list[str]) -> None:
        self._tuner().set_adapter(names)

    def _adapter(self, slot: SlotId, memory: str) -> str:
        return adapter_name(self._host.get(slot, slot), memory)

    def _layers(self) -> dict[str, Any]:
        """Base module name -> its PEFT LoRA layer (cached; PEFT injects them once per target)."""
        if self._layer_cache is None:
            self._layer_cache = {
                n: mod
                for n, mod in unwrap(self.model).named_modules()
                if isinstance(mod, LoraLayer)
            }
        return self._layer_cache

    def _lora_layers(self, slot: SlotId, memory: str) -> dict[str, Any]:
        name = self._adapter(slot, memory)
        layers = self._layers()
        return {
            t.module: layers[t.module]
            for t in self._specs[slot].targets
            if t.module in layers and name in layers[t.module].lora_B
        }

    def _b_params(self, slot: SlotId, memory: str) -> dict[str, torch.nn.Parameter]:
        name = self._adapter(slot, memory)
        return {
            n: layer.lora_B[name].weight for n, layer in self._lora_layers(slot, memory).items()
        }
