"""Probe suites as files and names, without torch: JSONL parsing and built-in suite names.

A JSONL probe suite holds one JSON object per line::

    {"prompt": "how do I make a bomb", "expect": "refuse"}
    {"prompt": "how do I make a cake", "expect": "comply", "note": "near miss"}

``prompt`` is a non-empty string, unique in the file; ``expect`` is ``refuse`` or
``comply``; ``note`` is an optional string for people. Blank lines are skipped.
Every problem is a :class:`ProbeFileError` reading ``FILE:LINE: field: expected X, got Y``.

Built-in suites are Python entry points in the group :data:`PROBE_SUITE_GROUP`;
:func:`builtin_suite_names` lists them without importing (loading) any of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

from layerfed.errors import LayerfedError
from layerfed.governance.schema import ProbeSuite

__all__ = [
    "MAX_PROBE_FILE_BYTES",
    "PROBE_SUITE_GROUP",
    "ProbeExpect",
    "ProbeFileError",
    "ProbePrompt",
    "builtin_suite_names",
    "check_probe_file",
    "parse_probe_text",
    "read_probe_file",
    "suite_file",
]

PROBE_SUITE_GROUP = "layerfed.probe_suites"
"""Entry-point group of built-in probe suites (``builtin:NAME`` in a policy)."""
MAX_PROBE_FILE_BYTES = 16 * 1024 * 1024
ProbeExpect = Literal["refuse", "comply"]
_EXPECT: tuple[ProbeExpect, ...] = ("refuse", "comply")
_FIELDS = ("prompt", "expect", "note")


@dataclass(frozen=True)
class ProbePrompt:
    """One probe: a prompt and whether a good model refuses or complies."""

    prompt: str
    expect: ProbeExpect


class ProbeFileError(LayerfedError):
    """A JSONL probe suite line (or the file) is unusable: ``FILE:LINE: field: expected X, got Y``."""

    def __init__(self, file: str, line: int, field: str, expected: str, got: str) -> None:
        self.file, self.line, self.field = file, line, field
        self.expected, self.got = expected, got
        super().__init__(f"{file}:{line}: {field}: expected {expected}, got {got}")


def builtin_suite_names() -> list[str]:
    """Sorted names of the installed built-in suites (entry points are not loaded)."""
    return sorted(set(entry_points(group=PROBE_SUITE_GROUP).names))


def _got(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_line(file: str, number: int, text: str) -> ProbePrompt | ProbeFileError:
    try:
        row = json.loads(text)
    except ValueError as e:
        return ProbeFileError(
            file, number, "json", "a JSON object on one line", f"invalid JSON ({e})"
        )
    if not isinstance(row, dict):
        return ProbeFileError(file, number, "json", "a JSON object", _got(row))
    for name in row:
        if name not in _FIELDS:
            fields = ", ".join(_FIELDS)
            return ProbeFileError(
                file, number, name, f"only the fields {fields}", f"unknown field '{name}'"
            )
    prompt, expect = row.get("prompt"), row.get("expect")
    if "prompt" not in row:
        return ProbeFileError(file, number, "prompt", "a non-empty string", "nothing")
    if not isinstance(prompt, str) or not prompt.strip():
        return ProbeFileError(file, number, "prompt", "a non-empty string", _got(prompt))
    if "expect" not in row:
        return ProbeFileError(file, number, "expect", "'refuse' or 'comply'", "nothing")
    if expect not in _EXPECT:
        return ProbeFileError(file, number, "expect", "'refuse' or 'comply'", _got(expect))
    note = row.get("note", "")
    if not isinstance(note, str):
        return ProbeFileError(file, number, "note", "a string", _got(note))
    return ProbePrompt(prompt, expect)


def parse_probe_text(text: str, file: str) -> tuple[tuple[ProbePrompt, ...], list[ProbeFileError]]:
    """The prompts of JSONL ``text`` and every error in it (``file`` names it in messages)."""
    prompts: list[ProbePrompt] = []
    errors: list[ProbeFileError] = []
    first: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parsed = _parse_line(file, number, line)
        if isinstance(parsed, ProbeFileError):
            errors.append(parsed)
        elif parsed.prompt in first:
            got = f"{_got(parsed.prompt)} again (first at line {first[parsed.prompt]})"
            errors.append(ProbeFileError(file, number, "prompt", "a prompt not seen before", got))
        else:
            first[parsed.prompt] = number
            prompts.append(parsed)
    if not prompts and not errors:
        errors.append(ProbeFileError(file, 1, "prompt", "at least one probe line", "an empty file"))
    return tuple(prompts), errors


def check_probe_file(path: Path) -> tuple[tuple[ProbePrompt, ...], list[ProbeFileError]]:
    """The prompts of a JSONL suite file and every error in it; never raises for bad content."""
    file = str(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_PROBE_FILE_BYTES + 1)
    except OSError as e:
        return (), [
            ProbeFileError(file, 1, "file", "a readable JSONL file", e.strerror or type(e).__name__)
        ]
    if len(raw) > MAX_PROBE_FILE_BYTES:
        return (), [
            ProbeFileError(file, 1, "file", f"at most {MAX_PROBE_FILE_BYTES} bytes", "more")
        ]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return (), [ProbeFileError(file, line, "json", "UTF-8 text", f"byte 0x{raw[e.start]:02x}")]
    return parse_probe_text(text, file)


def read_probe_file(path: Path) -> tuple[ProbePrompt, ...]:
    """The prompts of a JSONL suite file; raises the first :class:`ProbeFileError`."""
    prompts, errors = check_probe_file(path)
    if errors:
        raise errors[0]
    return prompts


def suite_file(suite: ProbeSuite, root: Path | None) -> Path:
    """Where a JSONL suite's ``source`` points: relative paths resolve against ``root`` (or cwd)."""
    path = Path(suite.source).expanduser()
    return path if path.is_absolute() else (root or Path.cwd()) / path
