"""What changed between two policies, flagging loosened red lines, vetoes, ranks and limits.

Scopes and red lines are compared two ways. Given a model's parameter names
(:class:`~layerfed.governance.model_params.ModelParams`), each layer's scope and
the red lines are compared as the *sets of parameters* they match, ties
resolved: a scope loosens only when it reaches a parameter it did not, the red
lines only when a parameter stops being protected (itself or through a tie); a
pattern edit that matches the same parameters is no change. Without a model,
the patterns are compared as text, where a pattern covered by another
(``ln_f.*`` by ``ln_f.**``) is no widening or removal, but a tie cannot be seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from layerfed.governance.model_params import Aliases, ModelParams, alias_hit, in_scope_aliased
from layerfed.governance.patterns import glob_covers
from layerfed.governance.privacy_checks import privacy_loosened
from layerfed.governance.schema import LayerPolicy, Limits, Policy
from layerfed.governance.schema_roles import layer_roles

__all__ = ["Change", "diff_policies"]

_KEYED = {"layers": "name", "vetoes": "name", "probe_suites": "name", "principals": "name"}
_ACTION_STRENGTH = {"reject": 3, "hold": 2, "clip": 1}


@dataclass(frozen=True)
class Change:
    """One difference: where, before, after, and whether it loosens governance."""

    path: str
    old: Any
    new: Any
    loosened: bool = False
    why: str = ""

    @property
    def section(self) -> str:
        """The top-level part of the policy the change is in, e.g. ``layers.individual``."""
        parts = self.path.split(".")
        return ".".join(parts[:2]) if parts[0] in _KEYED else parts[0]


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else key, out)
        return
    if isinstance(value, list) and prefix in _KEYED:
        for item in value:
            _flatten(item, f"{prefix}.{item[_KEYED[prefix]]}", out)
        return
    out[prefix] = value


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _loosens(path: str, old: Any, new: Any) -> str:
    """Why a change loosens governance, or an empty string."""
    leaf = path.rsplit(".", 1)[-1]
    o, n = _number(old), _number(new)
    if path.startswith("red_lines.parameters") and isinstance(old, list):
        removed = _uncovered(old, new or [])
        return f"red-line parameters removed: {removed}" if removed else ""
    if path == "red_lines.probes":
        return _probes_loosened(old or [], new or [])
    if path == "red_lines.output_guard" and old and not new:
        return "output guard turned off"
    if path.startswith("vetoes."):
        return _veto_loosened(path, leaf, old, new)
    if path.startswith("superego."):
        if leaf == "enabled" and old and not new:
            return "superego disabled"
        if leaf in ("probability", "weight") and o is not None and n is not None and n < o:
            return f"superego {leaf} lowered"
        return ""
    if path.startswith("layers."):
        return _layer_loosened(path, leaf, old, new, o, n)
    if path.startswith("limits."):
        return _limit_raised(path, old, new)
    if path == "policy_signers.threshold" and o is not None and n is not None and n < o:
        return "fewer signatures needed for the next policy"
    return ""


def _probes_loosened(old: list[Any], new: list[Any]) -> str:
    after = {p["suite"]: p for p in new}
    for probe in old:
        if probe["suite"] not in after:
            return f"red-line probe '{probe['suite']}' removed"
        if after[probe["suite"]]["max_violation_rate"] > probe["max_violation_rate"]:
            return f"red-line probe '{probe['suite']}' threshold raised"
        narrowed = _protection_narrowed(probe, after[probe["suite"]])
        if narrowed:
            return f"red-line probe '{probe['suite']}' {narrowed}"
        if after[probe["suite"]].get("acknowledge_breach") and not probe.get("acknowledge_breach"):
            return f"red-line probe '{probe['suite']}' breach acknowledged (starts over threshold)"
    return ""


_MECHANISMS = {"gate": {"gate"}, "projection": {"projection"}, "both": {"gate", "projection"}}


def _protection_narrowed(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Why ``new`` protects a red-line suite less than ``old``: a mechanism dropped, or a
    projection basis with fewer directions (lower energy, lower rank cap, exact -> truncated)."""
    was = _MECHANISMS.get(old.get("protect", "gate"), set())
    now = _MECHANISMS.get(new.get("protect", "gate"), set())
    if was - now:
        return f"protection narrowed: {sorted(was - now)} dropped"
    if "projection" not in now:
        return ""
    before = _basis_bounds(old.get("basis", "exact"))
    after = _basis_bounds(new.get("basis", "exact"))
    if after[0] < before[0]:
        return f"projection basis narrowed: energy {before[0]:g} -> {after[0]:g}"
    if after[1] < before[1]:
        return f"projection basis narrowed: max_rank {before[1]:g} -> {after[1]:g}"
    return ""


def _basis_bounds(basis: Any) -> tuple[float, float]:
    """``(energy, max_rank)`` of a basis as dumped; 'exact' keeps every direction."""
    if not isinstance(basis, dict):
        return 1.0, math.inf
    energy, rank = basis.get("energy"), basis.get("max_rank")
    return (1.0 if energy is None else float(energy)), (math.inf if rank is None else float(rank))


def _veto_loosened(path: str, leaf: str, old: Any, new: Any) -> str:
    if leaf == "action" and _ACTION_STRENGTH.get(new, 0) < _ACTION_STRENGTH.get(old, 0):
        return f"veto action weakened from {old} to {new}"
    if leaf == "applies_to" and isinstance(old, list):
        dropped = sorted(set(old) - set(new))
        return f"veto no longer applies to {dropped}" if dropped else ""
    o, n = _number(old), _number(new)
    if leaf in ("max_norm", "max_regression") and o is not None and n is not None and n > o:
        return f"veto {leaf} raised"
    if leaf == "min_signatures" and o is not None and n is not None and n < o:
        return "veto quorum lowered"
    return ""


def _layer_loosened(
    path: str, leaf: str, old: Any, new: Any, o: float | None, n: float | None
) -> str:
    if ".privacy." in path:
        return privacy_loosened(leaf, old, new)
    if leaf in ("server_lr", "lr", "lr_multiplier", "steps", "batch_size", "lora_rank", "rank"):
        if o is None or n is None:
            return ""
        return f"{leaf} raised" if n > o else ""
    if leaf == "norm_cap":
        if old is not None and new is None:
            return "norm cap removed"
        return "norm cap raised" if o is not None and n is not None and n > o else ""
    if leaf == "min_clients" and o is not None and n is not None and n < o:
        return "fewer clients needed per slot"
    if leaf == "include" and isinstance(old, list):
        added = _uncovered(new or [], old)
        return f"scope widened by {added}" if added else ""
    if leaf == "exclude" and isinstance(old, list):
        dropped = _uncovered(old, new or [])
        return f"scope exclusions dropped: {dropped}" if dropped else ""
    if leaf == "memories" and isinstance(old, list) and isinstance(new, list):
        before = {m["name"]: m for m in old}
        for memory in new:
            prior = before.get(memory["name"])
            if prior is None:
                continue
            if _slower_decay(prior.get("half_life"), memory.get("half_life")):
                return f"memory '{memory['name']}' decays more slowly"
            if memory["lr_multiplier"] > prior["lr_multiplier"]:
                return f"memory '{memory['name']}' learns faster"
        return ""
    if leaf == "updates_leave_instance" and not old and new:
        return "individual updates now leave the instance"
    return ""


def _uncovered(patterns: Sequence[str], by: Sequence[str]) -> list[str]:
    """The patterns of ``patterns`` that no pattern of ``by`` covers (text only, conservative)."""
    return sorted(p for p in set(patterns) if not any(glob_covers(b, p) for b in by))


def _slower_decay(old: Any, new: Any) -> bool:
    if old is not None and new is None:
        return True
    o, n = _number(old), _number(new)
    return o is not None and n is not None and n > o


def _new_layer_outranks(old: Policy, new: Policy, name: str) -> str:
    """Why an added layer loosens governance: it outranks layers that were already there."""
    rank = new.layer(name).rank
    below = sorted(layer.name for layer in old.layers if layer.rank < rank)
    if not below:
        return ""
    return f"new layer '{name}' (rank {rank}) outranks existing layer(s) {below}"


def _limit_raised(path: str, old: Any, new: Any) -> str:
    """Why a change to ``limits`` loosens governance (an absent limit is its default)."""
    field = path.split(".", 1)[1] if "." in path else ""
    default = Limits.model_fields[field].default if field in Limits.model_fields else None
    o, n = _number(default if old is None else old), _number(default if new is None else new)
    return f"limits.{field} raised" if o is not None and n is not None and n > o else ""


def _entries(flat: dict[str, Any]) -> set[str]:
    return {".".join(path.split(".")[:2]) for path in flat if path.split(".")[0] in _KEYED}


def diff_policies(old: Policy, new: Policy, params: ModelParams | None = None) -> list[Change]:
    """Every difference from ``old`` to ``new``, layer by layer, in a stable order.

    With ``params``, scopes and red lines compare as the parameters they match.
    """
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    _flatten(old.model_dump(mode="json"), "", before)
    _flatten(new.model_dump(mode="json"), "", after)
    changes = []
    gone, added = _entries(before) - _entries(after), _entries(after) - _entries(before)
    for entry in sorted(gone | added):
        kind = entry.split(".", 1)[0]
        if entry in gone:
            why = "veto removed" if kind == "vetoes" else ""
            changes.append(Change(entry, "present", None, bool(why), why))
        else:
            why = "a new principal may speak" if kind == "principals" else ""
            if kind == "layers":
                why = _new_layer_outranks(old, new, entry.split(".", 1)[1])
            changes.append(Change(entry, None, "added", bool(why), why))
    whole = gone | added
    for path in sorted(set(before) | set(after)):
        if any(path.startswith(entry + ".") for entry in whole):
            continue
        a, b = before.get(path), after.get(path)
        if a == b:
            continue
        why = _loosens(path, a, b)
        changes.append(Change(path, a, b, bool(why), why))
    changes = _roles_resolved(changes, old, new)
    return changes if params is None else _resolved(changes, old, new, params)


def _roles_resolved(changes: list[Change], old: Policy, new: Policy) -> list[Change]:
    """``changes`` with each layer's roles compared as the roles that train it (defaults filled).

    A role that may now train a shared layer (updates leave the instance) loosens governance.
    """
    kept = [c for c in changes if not (c.path.startswith("layers.") and c.path.endswith(".roles"))]
    before = {layer.name: layer for layer in old.layers}
    for layer in new.layers:
        if layer.name not in before:
            continue
        a, b = set(layer_roles(before[layer.name])), set(layer_roles(layer))
        if a == b:
            continue
        added = sorted(b - a)
        shared = layer.updates_leave_instance
        why = (
            f"more roles may train shared layer '{layer.name}': {added}" if added and shared else ""
        )
        path = f"layers.{layer.name}.roles"
        kept.append(Change(path, sorted(a), sorted(b), bool(why), why))
    return kept


_PATTERN_LEAVES = (".scope.include", ".scope.exclude")
PROTECTED = "red_lines.parameters.protected"
"""Path of the resolved red-line change: parameters no longer / newly protected."""


def _scope_set(layer: LayerPolicy, names: list[str], aliases: Aliases) -> set[str]:
    scope = layer.scope
    return {n for n in names if in_scope_aliased(n, scope.include, scope.exclude, aliases)}


def _protected(policy: Policy, names: list[str], aliases: Aliases) -> set[str]:
    red = policy.red_lines.parameters
    return {n for n in names if alias_hit(n, red, aliases) is not None}


def _resolved(changes: list[Change], old: Policy, new: Policy, params: ModelParams) -> list[Change]:
    """``changes`` with pattern edits replaced by changes of the parameter sets they match."""
    names, aliases = params.names, params.aliases()
    kept = [
        c
        for c in changes
        if not (c.path.startswith("layers.") and c.path.endswith(_PATTERN_LEAVES))
        and c.path != "red_lines.parameters"
    ]
    before = {layer.name: layer for layer in old.layers}
    for layer in new.layers:
        if layer.name not in before:
            continue
        a, b = _scope_set(before[layer.name], names, aliases), _scope_set(layer, names, aliases)
        if a != b:
            added = sorted(b - a)
            why = f"scope reaches {len(added)} more parameter(s): {added}" if added else ""
            path = f"layers.{layer.name}.scope.parameters"
            kept.append(Change(path, sorted(a - b), added, bool(why), why))
    a, b = _protected(old, names, aliases), _protected(new, names, aliases)
    if a != b:
        lost = sorted(a - b)
        why = f"red-line parameters no longer protected: {lost}" if lost else ""
        kept.append(Change(PROTECTED, lost, sorted(b - a), bool(why), why))
    return sorted(kept, key=lambda c: (c.path.split(".")[0], c.path))
