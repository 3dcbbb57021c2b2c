"""Plain YAML scalars that YAML 1.1 and YAML 1.2 readers read differently.

PyYAML (and so layerfed) reads YAML 1.1, where ``010`` is octal 8, ``1:00`` is
60, ``yes``/``on`` are booleans and ``1_000`` is a thousand; a YAML 1.2 tool
(an editor, a linter, a CI script, another language's loader) reads ``10``, the
string ``'1:00'``, the string ``'yes'`` and the string ``'1_000'``. A policy
must mean one thing to every reader, so such scalars are refused and the writer
is told to quote them (or to write the number they mean plainly).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from layerfed.governance.sources import MAX_DEPTH, MAX_NODES, Path_

__all__ = ["Ambiguity", "ambiguous_scalars", "yaml12_reading"]

_BOOL_11 = re.compile(r"(?i)yes|no|on|off|y|n")
_LEADING_ZERO = re.compile(r"[-+]?0[0-9_]+(\.[0-9_]*)?")
_SEXAGESIMAL = re.compile(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?")
_OCTAL_12 = re.compile(r"[-+]?0o[0-7_]+")
_BINARY_11 = re.compile(r"[-+]?0b[01_]+")
_HEX_11_ONLY = re.compile(r"[-+]0x[0-9a-fA-F_]+|0x[0-9a-fA-F_]*_[0-9a-fA-F_]*")
_UNDERSCORED = re.compile(r"[-+]?[0-9][0-9_]*_[0-9_]*(\.[0-9_]*)?([eE][-+]?[0-9]+)?")
_INT_12 = re.compile(r"[-+]?[0-9]+")
_OCT_12 = re.compile(r"0o[0-7]+")
_HEX_12 = re.compile(r"0x[0-9a-fA-F]+")
_FLOAT_12 = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


@dataclass(frozen=True)
class Ambiguity:
    """A plain scalar at ``path`` (1-based ``line``/``column``) with two readings."""

    path: Path_
    line: int
    column: int
    text: str
    yaml11: Any
    yaml12: Any
    kind: str

    @property
    def message(self) -> str:
        """``expected ..., got ...`` with both readings and how to fix it."""
        return (
            f"expected a value every YAML reader reads alike (this {self.kind} reads as "
            f"{_show(self.yaml11)} in YAML 1.1 but {_show(self.yaml12)} in YAML 1.2; "
            f"quote it ('{self.text}') for a string, or write the value you mean plainly), "
            f"got {self.text}"
        )


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string '{value}'"
    return repr(value)


def yaml12_reading(text: str) -> Any:
    """What a YAML 1.2 core-schema reader makes of a plain scalar."""
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE", "false", "False", "FALSE"):
        return text[0] in "tT"
    if _INT_12.fullmatch(text):
        return int(text, 10)
    if _OCT_12.fullmatch(text):
        return int(text[2:], 8)
    if _HEX_12.fullmatch(text):
        return int(text[2:], 16)
    if _FLOAT_12.fullmatch(text):
        return float(text)
    return text


def _kind(text: str) -> str | None:
    """Which 1.1/1.2 trap a plain scalar falls into, if any."""
    if _BOOL_11.fullmatch(text):
        return "YAML 1.1 boolean"
    if _LEADING_ZERO.fullmatch(text):
        return "leading-zero number"
    if _SEXAGESIMAL.fullmatch(text):
        return "sexagesimal (base 60) number"
    if _OCTAL_12.fullmatch(text):
        return "0o octal literal"
    if _BINARY_11.fullmatch(text):
        return "0b binary literal"
    if _HEX_11_ONLY.fullmatch(text):
        return "signed or underscored hex literal"
    if _UNDERSCORED.fullmatch(text):
        return "number with '_' separators"
    return None


def _yaml11_reading(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError):
        return node.value


class _Walker:
    def __init__(self) -> None:
        self.loader = yaml.SafeLoader("")
        self.count = 0

    def walk(self, node: yaml.Node, path: Path_, depth: int) -> Iterator[Ambiguity]:
        self.count += 1
        if self.count > MAX_NODES or depth > MAX_DEPTH:
            return
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                yield from self.walk(value, (*path, str(key.value)), depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                yield from self.walk(item, (*path, i), depth + 1)
        elif isinstance(node, yaml.ScalarNode) and node.style is None:
            yield from self._scalar(node, path)

    def _scalar(self, node: yaml.ScalarNode, path: Path_) -> Iterator[Ambiguity]:
        text = str(node.value)
        resolve: Callable[..., str] = self.loader.resolve
        implicit = resolve(yaml.ScalarNode, text, (True, False))
        kind = _kind(text)
        if kind is None or node.tag != implicit:
            return  # not a trap, or an explicit tag such as !!str says what is meant
        old, new = _yaml11_reading(self.loader, node), yaml12_reading(text)
        if _BOOL_11.fullmatch(text):  # the 1.1 spec's y/n/yes/no/on/off, in any case
            old = text.lower() in ("y", "yes", "on")
        if type(old) is type(new) and old == new:
            return
        mark = node.start_mark
        yield Ambiguity(path, mark.line + 1, mark.column + 1, text, old, new, kind)


def ambiguous_scalars(text: str) -> list[Ambiguity]:
    """Every plain scalar in ``text`` whose YAML 1.1 and 1.2 readings differ.

    Call only on text that :func:`layerfed.governance.sources.read_yaml` accepted;
    anything unparseable yields no findings here.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return []
    if node is None:
        return []
    return list(_Walker().walk(node, (), 0))
