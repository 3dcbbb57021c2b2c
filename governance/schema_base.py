"""Shared pieces of the policy schema: field patterns, durations, the frozen base model."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BUILTIN_PREFIX",
    "DEFAULT_REFUSAL_TEXT",
    "DURATION_PATTERN",
    "FORMAT_VERSION",
    "NAME_PATTERN",
    "WORD_PATTERN",
    "Duration",
    "Frozen",
    "Name",
    "SlotKey",
    "Word",
    "omit_defaults",
    "parse_duration",
    "text_words",
]

FORMAT_VERSION: Literal[1] = 1
NAME_PATTERN = r"^[a-z][a-z0-9_]*$"
DURATION_PATTERN = r"^[0-9]+(\.[0-9]+)?(s|m|h|d)$"
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

SlotKey = Literal["global", "jurisdiction", "group", "instance"]
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
WORD_PATTERN = r"^[A-Za-z0-9']+$"
Word = Annotated[str, Field(pattern=WORD_PATTERN, max_length=64)]
"""One word of letters, digits or apostrophes (guard and judge words; matched case-insensitively)."""
BUILTIN_PREFIX = "builtin:"
DEFAULT_REFUSAL_TEXT = "Sorry, I cannot help with that."
Duration = Annotated[str, Field(pattern=DURATION_PATTERN, max_length=32)]


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``"90s"``, ``"6h"`` or ``"1.5d"``."""
    match = re.fullmatch(DURATION_PATTERN, text)
    if match is None:
        raise ValueError(f"expected a duration like '6h', got {text!r}")
    return float(text[:-1]) * _DURATION_UNITS[text[-1]]


def omit_defaults(data: dict[str, Any], model: BaseModel, names: tuple[str, ...]) -> dict[str, Any]:
    """``data`` without the fields ``names`` that hold their defaults.

    Fields added after policies were first signed are left out of dumps at their
    defaults, so canonical bytes (and signatures) of older policies still hold.
    """
    fields = type(model).model_fields
    for name in names:
        if name in data and getattr(model, name) == fields[name].get_default(
            call_default_factory=True
        ):
            del data[name]
    return data


def text_words(text: str) -> list[str]:
    """The lower-cased words of ``text`` as guard and judge words are matched against."""
    return re.findall(r"[a-z0-9']+", text.lower())


class Frozen(BaseModel):
    """A frozen pydantic model that forbids unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)
