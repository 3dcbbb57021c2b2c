"""Reinforcement schedules: which feedback opportunities are actually reinforced.

Each schedule is asked once per opportunity (``reinforce()``) and answers from its own
seeded ``numpy.random.Generator``, so a run is reproducible from its seed:

* ``Continuous()``: every opportunity;
* ``FixedRatio(n)``: exactly every n-th (the n-th, 2n-th, ...);
* ``VariableRatio(mean_n)``: after a run of opportunities whose length is drawn
  uniformly from ``1 .. 2 mean_n - 1`` (mean exactly ``mean_n``);
* ``Intermittent(p)``: each opportunity independently with probability ``p``.

:func:`from_spec` reads ``"continuous"``, ``"fixed_ratio:5"``, ``"variable_ratio:4"``,
``"intermittent:0.3"`` or the same as a mapping ``{"kind": "fixed_ratio", "n": 5}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from layerfed.clients.events import FieldError

__all__ = [
    "Continuous",
    "FixedRatio",
    "Intermittent",
    "InvalidSchedule",
    "Schedule",
    "VariableRatio",
    "from_spec",
]

Seed = int | np.random.Generator | None


class InvalidSchedule(FieldError):  # noqa: N818 (matches InvalidFeedback)
    """A schedule specification or parameter is malformed or out of range."""


@runtime_checkable
class Schedule(Protocol):
    """Decides, one opportunity at a time, whether to reinforce."""

    def reinforce(self) -> bool:
        """Whether this opportunity is reinforced; advances the schedule."""
        ...


def _rng(seed: Seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _positive_int(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidSchedule(field, "an integer >= 1", value)
    return value


class Continuous:
    """Reinforce every opportunity (CRF)."""

    def __init__(self, seed: Seed = None) -> None:
        del seed  # deterministic; accepted so every schedule is built the same way

    def reinforce(self) -> bool:
        """Always ``True``."""
        return True

    def __repr__(self) -> str:
        return "Continuous()"


class FixedRatio:
    """Reinforce exactly every n-th opportunity (FR n)."""

    def __init__(self, n: int, seed: Seed = None) -> None:
        del seed
        self.n = _positive_int("n", n)
        self._count = 0

    def reinforce(self) -> bool:
        """``True`` on the n-th, 2n-th, ... call."""
        self._count += 1
        if self._count == self.n:
            self._count = 0
            return True
        return False

    def __repr__(self) -> str:
        return f"FixedRatio({self.n})"


class VariableRatio:
    """Reinforce after a random number of opportunities with mean ``mean_n`` (VR n)."""

    def __init__(self, mean_n: int, seed: Seed = None) -> None:
        self.mean_n = _positive_int("mean_n", mean_n)
        self._rng = _rng(seed)
        self._left = self._draw()

    def _draw(self) -> int:
        return int(self._rng.integers(1, 2 * self.mean_n))  # uniform on 1 .. 2n - 1

    def reinforce(self) -> bool:
        """``True`` when the current run's drawn length is reached; then draw the next."""
        self._left -= 1
        if self._left == 0:
            self._left = self._draw()
            return True
        return False

    def __repr__(self) -> str:
        return f"VariableRatio({self.mean_n})"


class Intermittent:
    """Reinforce each opportunity independently with probability ``p``."""

    def __init__(self, p: float, seed: Seed = None) -> None:
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
            raise InvalidSchedule("p", "a probability in [0, 1]", p)
        self.p = float(p)
        self._rng = _rng(seed)

    def reinforce(self) -> bool:
        """A Bernoulli(p) draw."""
        return bool(self._rng.random() < self.p)

    def __repr__(self) -> str:
        return f"Intermittent({self.p})"


_PARAMS = {"continuous": None, "fixed_ratio": "n", "variable_ratio": "mean_n", "intermittent": "p"}


def from_spec(spec: str | Mapping[str, Any], seed: Seed = None) -> Schedule:
    """A schedule from ``"kind"``/``"kind:value"`` or ``{"kind": ..., <param>: ...}``."""
    kind, value = _split(spec)
    if kind not in _PARAMS:
        raise InvalidSchedule("kind", f"one of {', '.join(_PARAMS)}", kind)
    param = _PARAMS[kind]
    if param is None:
        if value is not None:
            raise InvalidSchedule(kind, "no parameter", value)
        return Continuous(seed)
    if value is None:
        raise InvalidSchedule(param, f"a value for {kind}", None)
    number = _number(param, value)
    if kind == "fixed_ratio":
        return FixedRatio(_as_int(param, number), seed)
    if kind == "variable_ratio":
        return VariableRatio(_as_int(param, number), seed)
    return Intermittent(number, seed)


def _split(spec: str | Mapping[str, Any]) -> tuple[str, object]:
    """``(kind, raw parameter or None)`` from either spelling of a spec."""
    if isinstance(spec, str):
        kind, sep, raw = spec.strip().partition(":")
        return kind.strip().lower(), raw.strip() if sep else None
    if not isinstance(spec, Mapping):
        raise InvalidSchedule("spec", "a string or a mapping", spec)
    kind = str(spec.get("kind", "")).lower()
    extra = set(spec) - {"kind", _PARAMS.get(kind) or "kind"}
    if extra:
        raise InvalidSchedule(sorted(extra)[0], f"only 'kind' and the {kind} parameter", spec)
    param = _PARAMS.get(kind)
    return kind, spec.get(param) if param else None


def _number(field: str, value: object) -> float:
    if isinstance(value, bool):
        raise InvalidSchedule(field, "a number", value)
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidSchedule(field, "a number", value) from None


def _as_int(field: str, number: float) -> int:
    if not number.is_integer():
        raise InvalidSchedule(field, "an integer >= 1", number)
    return int(number)
