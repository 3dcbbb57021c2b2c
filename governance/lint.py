"""Hardening checks run by the loader beside the semantic rules.

* :func:`lookalike_issues` runs on the raw document (before the schema), so a
  Cyrillic a (U+0430) in a layer name or red-line pattern is named for what it is;
* :func:`key_issues` compares principals' public keys as their raw 32 bytes and
  refuses non-canonical base64 spellings;
* :func:`limit_issues` holds per-round budgets under :class:`Limits` unless the
  policy raises them explicitly;
* :func:`did_you_mean` adds the closest defined name to an unknown-reference message.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import re
from collections.abc import Iterator
from typing import Any

from layerfed.governance.confusables import describe, findings, scripts
from layerfed.governance.schema import Limits, Policy
from layerfed.governance.semantics import Issue
from layerfed.governance.sources import Path_

__all__ = ["did_you_mean", "key_issues", "limit_issues", "lookalike_issues"]

_KEY_PREFIX = "ed25519:"

# Fields whose strings name things (error on any non-ASCII character).
_NAME_FIELDS: tuple[Path_, ...] = (
    ("layers", "*", "name"),
    ("layers", "*", "memories", "*", "name"),
    ("vetoes", "*", "name"),
    ("vetoes", "*", "holder"),
    ("vetoes", "*", "applies_to", "*"),
    ("vetoes", "*", "condition", "suite"),
    ("probe_suites", "*", "name"),
    ("principals", "*", "name"),
    ("principals", "*", "layer"),
    ("policy_signers", "principals", "*"),
    ("red_lines", "probes", "*", "suite"),
    ("superego", "suites", "*"),
)
# Glob patterns over (ASCII) parameter names: look-alikes protect or grant nothing.
_PATTERN_FIELDS: tuple[Path_, ...] = (
    ("red_lines", "parameters", "*"),
    ("layers", "*", "scope", "include", "*"),
    ("layers", "*", "scope", "exclude", "*"),
)
# Slot keys may be in any one script, but not in a mix of scripts or with invisibles.
_SLOT_FIELDS: tuple[Path_, ...] = (("principals", "*", "slots", "*"),)


def _at(data: Any, shape: Path_, path: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    """Values of ``data`` along ``shape`` (``"*"`` walks every list item)."""
    if not shape:
        yield path, data
        return
    head, rest = shape[0], shape[1:]
    if head == "*" and isinstance(data, list):
        for i, item in enumerate(data):
            yield from _at(item, rest, (*path, i))
    elif isinstance(head, str) and isinstance(data, dict) and head in data:
        yield from _at(data[head], rest, (*path, head))


def lookalike_issues(data: Any) -> list[Issue]:
    """Look-alike or invisible characters in names, patterns and slot keys of raw data."""
    out: list[Issue] = []
    for shapes, what in (
        (_NAME_FIELDS, "name"),
        (_PATTERN_FIELDS, "pattern"),
        (_SLOT_FIELDS, "slot key"),
    ):
        for shape in shapes:
            for path, value in _at(data, shape):
                if not isinstance(value, str):
                    continue
                why = describe(value)
                if why is None or (what == "slot key" and not _deceptive_slot(value)):
                    continue
                expected = (
                    "an ASCII name"
                    if what == "name"
                    else f"a {what} without look-alike or invisible characters"
                )
                out.append(Issue(path, f"expected {expected}, got {value!r}: {why}"))
    return out


def _deceptive_slot(value: str) -> bool:
    # A slot key written wholly in another script is legitimate; a mix, or an invisible, is not.
    invisible = any(f.looks_like is None for f in findings(value))
    return invisible or len(scripts(value)) > 1


def key_issues(policy: Policy) -> list[Issue]:
    """Non-canonical key spellings, and one key (as raw bytes) held by two principals."""
    out: list[Issue] = []
    owners: dict[bytes, tuple[str, str]] = {}
    for i, principal in enumerate(policy.principals):
        path: Path_ = ("principals", i, "public_key")
        text = principal.public_key
        try:
            raw = base64.b64decode(text[len(_KEY_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            continue  # the schema's pattern already refused it
        canonical = _KEY_PREFIX + base64.b64encode(raw).decode("ascii")
        if canonical != text:
            msg = (
                f"expected the canonical base64 spelling '{canonical}' (the last character "
                f"carries unused bits that must be zero), got '{text}'"
            )
            out.append(Issue(path, msg))
        owner = owners.get(raw)
        if owner is not None and owner[1] != text:
            msg = f"expected a key of its own, got the key of '{owner[0]}' spelt differently"
            out.append(Issue(path, msg))
        owners.setdefault(raw, (principal.name, text))
    return out


def limit_issues(policy: Policy) -> list[Issue]:
    """Per-round budgets above :class:`Limits` (the policy's own, or the defaults)."""
    limits = policy.limits or Limits()
    out: list[Issue] = []
    for i, layer in enumerate(policy.layers):
        steps, batch = layer.local.steps, layer.local.batch_size
        if steps * batch > limits.max_examples_per_round:
            got = f"{steps} x {batch} = {steps * batch} examples per client per round"
            msg = _over(
                "local.steps x local.batch_size", "max_examples_per_round", limits, steps * batch
            )
            out.append(Issue(("layers", i, "local", "steps"), f"{msg}, got {got}"))
        rank = layer.scope.lora_rank
        if rank > limits.max_lora_rank:
            msg = _over("scope.lora_rank", "max_lora_rank", limits, rank)
            out.append(Issue(("layers", i, "scope", "lora_rank"), f"{msg}, got {rank}"))
    return out


def _over(field: str, limit: str, limits: Limits, needed: int) -> str:
    value = getattr(limits, limit)
    return (
        f"expected {field} <= {value} (limits.{limit}; to allow more, raise it explicitly "
        f"with 'limits: {{{limit}: {needed}}}')"
    )


_UNKNOWN_REF = re.compile(r"expected one of ((?:'[^']*'(?:, )?)+), got '([^']*)'")


def did_you_mean(message: str) -> str:
    """``expected one of 'a', 'b', got 'x'`` plus the closest name, when one is close."""
    match = _UNKNOWN_REF.fullmatch(message)
    if match is None:
        return message
    names = re.findall(r"'([^']*)'", match.group(1))
    close = difflib.get_close_matches(match.group(2), names, n=1, cutoff=0.6)
    if not close:
        return message
    known, got = match.group(1), match.group(2)
    return f"expected one of {known} (did you mean '{close[0]}'?), got '{got}'"
