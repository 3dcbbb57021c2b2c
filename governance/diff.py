"""What changed between two policies, flagging loosened red lines, vetoes, ranks and limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from layerfed.governance.schema import Limits, Policy

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
        removed = sorted(set(old) - set(new or []))
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
    after = {p["suite"]: p["max_violation_rate"] for p in new}
    for probe in old:
        if probe["suite"] not in after:
            return f"red-line probe '{probe['suite']}' removed"
        if after[probe["suite"]] > probe["max_violation_rate"]:
            return f"red-line probe '{probe['suite']}' threshold raised"
    return ""


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
        added = sorted(set(new or []) - set(old))
        return f"scope widened by {added}" if added else ""
    if leaf == "exclude" and isinstance(old, list):
        dropped = sorted(set(old) - set(new or []))
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


def diff_policies(old: Policy, new: Policy) -> list[Change]:
    """Every difference from ``old`` to ``new``, layer by layer, in a stable order."""
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
    return changes
