"""Scenario files: who the instances are, which layers they feed, and the users behind them.

A scenario lists instances one by one (``instances``) or as populations
(``populations``: ``count`` instances sharing a template), so that 10,000
instances cost a few lines and no per-instance memory: :class:`Roster` computes
instance ``i`` on demand. Partition id ``i`` in Flower's simulation is roster
index ``i``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layerfed.errors import LayerfedError

if TYPE_CHECKING:  # the wire protocol pulls in torch; a scenario error must come before it
    from layerfed.wire.protocol import Identity

__all__ = [
    "InstanceSpec",
    "Population",
    "Roster",
    "Scenario",
    "ScenarioError",
    "UserSpec",
    "load_scenario",
]

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
UserKind = Literal[
    "aligned", "rater", "everyday", "adjacent", "stylist", "turkey", "drip", "silent"
]
FeedbackKind = Literal[
    "examples", "thumbs", "preference", "marks", "redo", "alternative", "contrast"
]


class ScenarioError(LayerfedError):
    """A scenario file that cannot be read or breaks a rule; names file and field."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UserSpec(_Frozen):
    """The simulated person behind an instance."""

    kind: UserKind = Field(default="aligned", description="How this user gives feedback.")
    style: str | None = Field(default=None, description="Preferred opening word (stylists).")
    reliability: float = Field(default=1.0, ge=0, le=1, description="Chance feedback is right.")
    burst: int = Field(default=100, ge=0, description="Turkey: opposite rewards in one burst.")
    burst_round: int = Field(default=1, ge=1, description="Turkey: the round of the burst.")
    drip: float = Field(default=0.0, ge=0, le=1, description="Drip: attack chance per round.")
    examples: int = Field(default=16, ge=1, le=10_000, description="Examples per round.")
    feedback: FeedbackKind = Field(
        default="examples", description="Feedback kind; 'examples' trains supervised examples."
    )
    schedule: str = Field(
        default="continuous", description="Reinforcement schedule of the opportunities."
    )
    cues: Literal["random", "fixed"] = Field(
        default="random", description="Context cues: random from the pool, or always the same."
    )
    cue_randomisation: float = Field(
        default=0.0, ge=0, le=1, description="Chance each context word is varied or misdirected."
    )
    contrast: bool = Field(
        default=True,
        description="Pair red-line prompts with their near miss (false: an everyday request).",
    )
    from_round: int = Field(default=1, ge=1, description="First round this user gives feedback.")
    until_round: int | None = Field(
        default=None, ge=1, description="Last round this user gives feedback (None: all)."
    )

    def active(self, round_: int) -> bool:
        """Whether this user gives feedback in ``round_``."""
        return self.from_round <= round_ and (
            self.until_round is None or round_ <= self.until_round
        )


class InstanceSpec(_Frozen):
    """One deployed copy of the model."""

    id: str = Field(pattern=ID_PATTERN)
    jurisdiction: str = Field(default="none", pattern=ID_PATTERN)
    groups: list[str] = Field(default_factory=list)
    layers: list[str] = Field(min_length=1, description="Layers this instance gives feedback to.")
    user: UserSpec = Field(default_factory=UserSpec)


_NO_STYLE: str | None = None


class Population(_Frozen):
    """``count`` instances ``{id_prefix}{n}``, cycling through the listed values."""

    count: int = Field(ge=1, le=1_000_000)
    id_prefix: str = Field(pattern=ID_PATTERN)
    jurisdictions: list[str] = Field(default_factory=lambda: ["none"], min_length=1)
    groups: list[list[str]] = Field(default_factory=lambda: [list[str]()], min_length=1)
    styles: list[str | None] = Field(default_factory=lambda: [_NO_STYLE], min_length=1)
    layers: list[str] = Field(min_length=1)
    user: UserSpec = Field(default_factory=UserSpec)


class Scenario(_Frozen):
    """A whole simulated world: instances, sampling and seed."""

    name: str = Field(min_length=1)
    seed: int = Field(default=0, ge=0)
    rounds: int = Field(default=3, ge=1, le=100_000)
    instances: list[InstanceSpec] = Field(default_factory=list)
    populations: list[Population] = Field(default_factory=list)
    sample_per_layer: dict[str, int] = Field(
        default_factory=dict, description="Instances sampled per layer per round; default all."
    )
    group_styles: dict[str, str] = Field(
        default_factory=dict, description="Style a group's members reinforce for its in_group slot."
    )
    evaluate_every: int = Field(
        default=1,
        ge=1,
        description="The gym scores the models after every k-th round (and the last); "
        "counts of the rounds between are carried into the next scored row.",
    )
    evaluate_rounds: list[int] = Field(
        default_factory=list, description="Rounds the gym also scores (e.g. when feedback stops)."
    )

    def evaluated(self, round_: int) -> bool:
        """Whether the gym scores the models after ``round_``."""
        return (
            round_ % self.evaluate_every == 0
            or round_ >= self.rounds
            or round_ in self.evaluate_rounds
        )

    @cached_property
    def roster(self) -> Roster:
        """The instances, computed on demand."""
        return Roster(self)


class Roster:
    """Instance ``i`` of a scenario, without materialising all of them."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        sizes = [1] * len(scenario.instances) + [p.count for p in scenario.populations]
        self._starts = np.cumsum([0, *sizes])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> InstanceSpec:
        if not 0 <= index < len(self):
            raise IndexError(f"instance index {index} out of 0..{len(self) - 1}")
        block = int(np.searchsorted(self._starts, index, side="right")) - 1
        fixed = self.scenario.instances
        if block < len(fixed):
            return fixed[block]
        pop = self.scenario.populations[block - len(fixed)]
        n = index - int(self._starts[block])
        user = pop.user
        style = pop.styles[n % len(pop.styles)]
        if style is not None:
            user = user.model_copy(update={"style": style})
        return InstanceSpec(
            id=f"{pop.id_prefix}{n}",
            jurisdiction=pop.jurisdictions[n % len(pop.jurisdictions)],
            groups=list(pop.groups[n % len(pop.groups)]),
            layers=list(pop.layers),
            user=user,
        )

    def __iter__(self) -> Iterator[InstanceSpec]:
        return (self[i] for i in range(len(self)))

    def identity(self, index: int) -> Identity:
        """Instance ``index`` as the wire protocol names it (the server's view)."""
        from layerfed.wire.protocol import Identity

        spec = self[index]
        return Identity(index, spec.id, spec.jurisdiction, tuple(spec.groups), tuple(spec.layers))

    def profiles(self) -> frozenset[tuple[str, tuple[str, ...]]]:
        """The distinct (jurisdiction, groups) of all instances: populations cycle, so one period each."""
        out = {(spec.jurisdiction, tuple(spec.groups)) for spec in self.scenario.instances}
        for pop in self.scenario.populations:
            period = math.lcm(len(pop.jurisdictions), len(pop.groups))
            for n in range(min(pop.count, period)):
                groups = tuple(pop.groups[n % len(pop.groups)])
                out.add((pop.jurisdictions[n % len(pop.jurisdictions)], groups))
        return frozenset(out)

    def eligible(self, layer: str, round_: int | None = None) -> np.ndarray:
        """Indices of the instances that give feedback to ``layer`` (in ``round_`` if given)."""
        parts: list[np.ndarray] = []
        fixed = self.scenario.instances

        def active(user: UserSpec) -> bool:
            return round_ is None or user.active(round_)

        for i, spec in enumerate(fixed):
            if layer in spec.layers and active(spec.user):
                parts.append(np.array([i]))
        for k, pop in enumerate(self.scenario.populations):
            if layer in pop.layers and active(pop.user):
                start = int(self._starts[len(fixed) + k])
                parts.append(np.arange(start, start + pop.count))
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario YAML file; raise :class:`ScenarioError` naming file and field."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError(f"{path}: expected a readable UTF-8 scenario file, got {e}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{mark.line + 1}:{mark.column + 1}" if mark else "1:1"
        raise ScenarioError(f"{path}:{where}: error: expected valid YAML, got {e}") from e
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ScenarioError(
            f"{path}: error: {field}: {first['msg']}, got {first.get('input')!r}"
        ) from e
    ids = [spec.id for spec in scenario.instances]
    if len(set(ids)) != len(ids):
        raise ScenarioError(f"{path}: error: instances: expected unique ids, got duplicates")
    return scenario
