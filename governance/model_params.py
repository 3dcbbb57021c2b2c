"""A base model's parameters as policy checks see them: names, shapes and tied aliases.

Governance never loads a model (no torch here): :mod:`layerfed.layers.params`
reads one into a :class:`ModelParams`, and the CLI hands that reader to
``policy check --model`` through the Typer context as a :class:`ModelReader`.
Tied parameters (GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``) are
one storage under two names: a red line or a scope exclude on either name applies
to both, while a scope include never widens over a tie.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from layerfed.governance.patterns import matches, matches_any

if TYPE_CHECKING:
    from layerfed.governance.reachability import LayerReach
    from layerfed.governance.schema import Policy

__all__ = [
    "Aliases",
    "ModelParams",
    "ModelReader",
    "alias_hit",
    "in_scope_aliased",
    "tie_issues",
]

Aliases = Mapping[str, Sequence[str]]
"""Parameter name -> every name sharing its storage, itself included (tied names only)."""


@dataclass(frozen=True)
class ModelParams:
    """What a policy writer needs of a model: parameter shapes, ties and LoRA targets."""

    model: str
    shapes: Mapping[str, tuple[int, ...]]
    ties: tuple[tuple[str, ...], ...] = ()
    """Groups of names sharing one storage, each sorted, groups sorted."""
    lora: frozenset[str] = field(default_factory=frozenset)
    """Weights a scope can target with LoRA (of Linear or Conv1D modules)."""

    @property
    def names(self) -> list[str]:
        """Every parameter and buffer name, sorted (tied ones under each name)."""
        return sorted(self.shapes)

    def aliases(self) -> dict[str, tuple[str, ...]]:
        """Tied name -> its whole group (itself included)."""
        return {name: group for group in self.ties for name in group}


@dataclass(frozen=True)
class ModelReader:
    """Reads ``'builtin:NAME'`` or a local model folder; CLI commands find it in ctx.obj.

    ``read(model)`` gives the names, shapes and ties; the CLI's reader reads them
    without weights (:mod:`layerfed.layers.param_names`). ``scenario(path, policy)``,
    when given, reads a scenario's population per layer for the reachability checks.
    ``red_lines(policy, model)``, when given, measures each red-line suite's violation
    rate on the model (weights loaded: ``policy check --model`` only).
    """

    read: Callable[[str], ModelParams]
    scenario: Callable[[str, Policy], Mapping[str, LayerReach]] | None = None
    red_lines: Callable[[Policy, str], Mapping[str, float]] | None = None


def alias_hit(name: str, patterns: Iterable[str], aliases: Aliases | None) -> str | None:
    """The first of ``name`` and its aliases that matches a pattern (``name`` itself first)."""
    pats = list(patterns)
    names = [name, *(a for a in (aliases or {}).get(name, ()) if a != name)]
    return next((n for n in names if matches_any(n, pats)), None)


def in_scope_aliased(
    name: str, include: Iterable[str], exclude: Iterable[str], aliases: Aliases | None
) -> bool:
    """Whether ``name`` is included, and neither it nor any alias is excluded."""
    return matches_any(name, include) and alias_hit(name, exclude, aliases) is None


def tie_issues(policy: Policy, params: ModelParams) -> Iterator[tuple[str, str]]:
    """``(field path, message)`` for each scope pattern reaching a red line only through a tie.

    A parameter matching a red line itself is the semantic checks' business; this
    adds the case ``check_policy_file`` cannot see from names alone.
    """
    aliases = params.aliases()
    red = policy.red_lines.parameters
    for i, layer in enumerate(policy.layers):
        scope = layer.scope
        for m, pattern in enumerate(scope.include):
            for name in params.names:
                if name not in aliases or not matches(name, pattern):
                    continue
                if matches_any(name, red) or not in_scope_aliased(
                    name, [pattern], scope.exclude, aliases
                ):
                    continue
                hit = alias_hit(name, red, aliases)
                if hit is not None:
                    yield (
                        f"layers[{i}].scope.include[{m}]",
                        f"expected no red-line parameter, got '{name}' (pattern '{pattern}'),"
                        f" tied to red-line parameter '{hit}'",
                    )
