"""Red-line protection: digests of protected parameters and checks on update names.

Red-line parameters are never LoRA targets, and every commit re-checks a
SHA-256 digest over their exact bytes (name, dtype, shape, data), so any change
to one of them, however it happened, is caught. The digest is taken in the dtype the
base is loaded in (its stored dtype): a float32 base's digest is ``sha256:<hex>``, any
other's ends ``;dtype=<name>``, so a base loaded in another dtype than the recorded
digest's is refused as such (:class:`RedLineDtypeError`), not as a changed parameter.
Red lines resolve over tied
parameters (:mod:`~layerfed.layers.aliases`): a red line on
``transformer.wte.weight`` also protects GPT-2's ``lm_head.weight``, and the
reverse.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from layerfed.governance.schema import Policy
from layerfed.layers.aliases import Aliases, alias_hit, in_scope_aliased, tied_parameters
from layerfed.layers.base import base_parameters
from layerfed.layers.errors import RedLineViolation, ScopeError, SlotError
from layerfed.layers.slots import parse_array_name, policy_layer

__all__ = [
    "RedLineDtypeError",
    "check_update_names",
    "digest_dtype",
    "protected_parameters",
    "redline_digest",
    "verify_redlines",
]

_DTYPE_TAG = ";dtype="


class RedLineDtypeError(RedLineViolation):
    """The base is loaded in another dtype than the one its red-line digest was recorded in."""


def protected_parameters(
    model: torch.nn.Module, patterns: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Base parameters (by base name) that match a red-line pattern, or are tied to one that does."""
    pats = list(patterns)
    aliases = tied_parameters(model)
    return {
        n: t for n, t in base_parameters(model).items() if alias_hit(n, pats, aliases) is not None
    }


def redline_digest(model: torch.nn.Module, patterns: Iterable[str]) -> str:
    """``"sha256:<hex>"`` over the name, dtype, shape and bytes of every red-line parameter."""
    h = hashlib.sha256(b"layerfed/redlines/v1\n")
    floats: set[str] = set()
    for name, tensor in sorted(protected_parameters(model, patterns).items()):
        data = tensor.detach().cpu().contiguous()
        h.update(f"{name}\n{data.dtype}\n{tuple(data.shape)}\n".encode())
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        if data.is_floating_point():
            floats.add(str(data.dtype).removeprefix("torch."))
    tag = "" if floats <= {"float32"} else _DTYPE_TAG + ",".join(sorted(floats))
    return "sha256:" + h.hexdigest() + tag


def digest_dtype(digest: str) -> str:
    """The dtype a red-line digest was taken in (``float32`` when it names none)."""
    _, sep, dtype = digest.partition(_DTYPE_TAG)
    return dtype if sep else "float32"


def verify_redlines(model: torch.nn.Module, patterns: Iterable[str], digest: str) -> None:
    """Raise :class:`RedLineViolation` unless the red-line parameters still hash to ``digest``.

    :class:`RedLineDtypeError` when the base is loaded in another dtype than the digest's.
    """
    pats = list(patterns)
    got = redline_digest(model, pats)
    if digest_dtype(got) != digest_dtype(digest):
        raise RedLineDtypeError(
            f"red-line parameters {pats}: expected a base loaded in {digest_dtype(digest)} "
            f"(the dtype the recorded digest was taken in), got {digest_dtype(got)}; load the "
            "base with that dtype setting, or start from a store recorded in this one"
        )
    if got != digest:
        raise RedLineViolation(
            f"red-line parameters {pats}: expected digest {digest}, got {got} "
            "(a protected parameter changed)"
        )


def check_update_names(
    policy: Policy,
    arrays: Mapping[str, np.ndarray] | Iterable[str],
    *,
    aliases: Aliases | None = None,
) -> None:
    """Refuse names that touch a red-line or out-of-scope parameter, or an unknown memory.

    ``aliases`` (:func:`~layerfed.layers.aliases.tied_parameters` of the base model)
    extends red lines and scope excludes over tied parameters: with GPT-2's, a red
    line on ``transformer.wte.weight`` refuses an update of ``lm_head``.
    """
    for name in arrays:
        parsed = parse_array_name(name)
        layer = policy_layer(policy, parsed.slot)
        memories = [m.name for m in layer.memories]
        if parsed.memory not in memories:
            raise SlotError(
                f"array {name!r}: expected a memory of layer {layer.name!r} in {memories}, "
                f"got {parsed.memory!r}"
            )
        hit = alias_hit(parsed.parameter, policy.red_lines.parameters, aliases)
        if hit is not None:
            tied = "" if hit == parsed.parameter else f" (tied to red-line parameter {hit!r})"
            raise RedLineViolation(
                f"array {name!r}: expected no red-line parameter, got {parsed.parameter!r}{tied}"
            )
        scope = layer.scope
        if not in_scope_aliased(parsed.parameter, scope.include, scope.exclude, aliases):
            raise ScopeError(
                f"array {name!r}: expected a parameter in layer {layer.name!r} scope "
                f"{layer.scope.include} (minus {layer.scope.exclude}), got {parsed.parameter!r}"
            )
