"""Import datasets in TRL's formats as feedback events.

* preference (DPO): ``prompt`` / ``chosen`` / ``rejected`` → :class:`Preference`;
* unpaired preference (KTO): ``prompt`` / ``completion`` / ``label`` → :class:`Thumbs`.

Rows come from an iterable of mappings (errors name ``row N``, 1-based) or a JSONL
file (errors name ``path:N``, the 1-based line). Fields may be plain strings (TRL's
standard format) or lists of ``{"role", "content"}`` messages (its conversational
format), which are rendered as ``role: content`` lines. Other columns are ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from layerfed.clients.events import InvalidFeedback, Preference, Thumbs

__all__ = ["Rows", "import_preferences", "import_unpaired", "render_messages"]

E = TypeVar("E", Preference, Thumbs)
Rows = Iterable[Mapping[str, Any]] | str | os.PathLike[str]


def import_preferences(rows: Rows) -> list[Preference]:
    """TRL preference rows (prompt, chosen, rejected) as :class:`Preference` events."""
    out: list[Preference] = []
    for where, row in _rows(rows):
        fields = {name: _text(row, name, where) for name in ("prompt", "chosen", "rejected")}
        out.append(_build(Preference, fields, where))
    return out


def import_unpaired(rows: Rows) -> list[Thumbs]:
    """TRL unpaired rows (prompt, completion, label) as :class:`Thumbs` events."""
    out: list[Thumbs] = []
    for where, row in _rows(rows):
        label = _field(row, "label", where)
        if not isinstance(label, bool):
            raise InvalidFeedback("label", "a boolean (true or false)", label, where)
        prompt, response = _text(row, "prompt", where), _text(row, "completion", where)
        out.append(_build(Thumbs, {"prompt": prompt, "response": response, "up": label}, where))
    return out


def render_messages(messages: list[Any], field: str, where: str) -> str:
    """A conversational field as ``role: content`` lines."""
    lines = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            expected = "a message {'role': ..., 'content': <string>}"
            raise InvalidFeedback(f"{field}[{i}]", expected, message, where)
        role = message.get("role", "user")
        lines.append(f"{role}: {message['content']}")
    return "\n".join(lines)


def _build(cls: type[E], fields: dict[str, Any], where: str) -> E:
    try:
        return cls(**fields)
    except ValidationError as e:
        raise InvalidFeedback.from_validation(e, where) from e


def _field(row: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in row:
        raise InvalidFeedback(name, "a value (the column is required)", sorted(row), where)
    return row[name]


def _text(row: Mapping[str, Any], name: str, where: str) -> str:
    value = _field(row, name, where)
    if isinstance(value, list):
        return render_messages(value, name, where)
    if not isinstance(value, str):
        raise InvalidFeedback(name, "a string or a list of messages", value, where)
    return value


def _rows(rows: Rows) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(location, row)`` pairs from a JSONL path or an iterable of mappings."""
    if isinstance(rows, str | os.PathLike):
        yield from _jsonl(Path(rows))
        return
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping):
            raise InvalidFeedback("<row>", "a mapping of column names to values", row, f"row {n}")
        yield f"row {n}", row


def _jsonl(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    with path.open(encoding="utf-8") as handle:
        for n, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidFeedback("<line>", "one JSON object", line.strip(), where) from e
            if not isinstance(row, dict):
                raise InvalidFeedback("<line>", "one JSON object", row, where)
            yield where, row
