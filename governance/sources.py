"""Read YAML and TOML into plain data plus a map from field path to (line, column).

Both readers are defensive: whatever the bytes, they return data or raise
:class:`SourceError` with a position; they never let a parser's own exception out.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["Located", "Path_", "SourceError", "read_toml", "read_yaml"]

Path_ = tuple[str | int, ...]
MAX_DEPTH = 48
MAX_NODES = 200_000


class SourceError(Exception):
    """A syntax-level problem at a position (1-based line and column)."""

    def __init__(self, line: int, column: int, message: str) -> None:
        self.line, self.column, self.message = line, column, message
        super().__init__(f"{line}:{column}: {message}")


@dataclass
class Located:
    """Parsed data with the positions of values and keys by field path."""

    data: Any
    values: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path_, tuple[int, int]] = field(default_factory=dict)

    def position(self, path: Path_, *, key: bool = False) -> tuple[int, int]:
        """Best position for ``path``: exact if known, else its nearest known ancestor."""
        table = self.keys if key else self.values
        for cut in range(len(path), -1, -1):
            sub = path[:cut]
            if sub in table:
                return table[sub]
            if sub in self.values:
                return self.values[sub]
            if sub in self.keys:
                return self.keys[sub]
        return (1, 1)


# --------------------------------------------------------------------------- YAML


class _YamlBuilder:
    def __init__(self, loader: yaml.SafeLoader, out: Located) -> None:
        self.loader, self.out, self.count = loader, out, 0

    def build(self, node: yaml.Node, path: Path_, depth: int, active: frozenset[int]) -> Any:
        self.count += 1
        mark = node.start_mark
        pos = (mark.line + 1, mark.column + 1)
        if self.count > MAX_NODES:
            raise SourceError(*pos, f"document too large (more than {MAX_NODES} nodes)")
        if depth > MAX_DEPTH or id(node) in active:
            raise SourceError(*pos, "nesting too deep or recursive alias")
        self.out.values.setdefault(path, pos)
        inner = active | {id(node)}
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth, inner)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(n, (*path, i), depth + 1, inner) for i, n in enumerate(node.value)]
        if node.tag == "tag:yaml.org,2002:timestamp":
            return str(node.value)
        try:
            return self.loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
            raise SourceError(*pos, f"cannot read scalar: {e}") from e

    def _mapping(
        self, node: yaml.MappingNode, path: Path_, depth: int, active: frozenset[int]
    ) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            kpos = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise SourceError(*kpos, "merge keys ('<<') are not supported in policies")
            if not isinstance(key_node, yaml.ScalarNode):
                raise SourceError(*kpos, "expected a plain key, got a collection")
            key = str(key_node.value)
            if key in result:
                raise SourceError(*kpos, f"duplicate key '{key}'")
            self.out.keys[(*path, key)] = kpos
            result[key] = self.build(value_node, (*path, key), depth + 1, active)
        return result


def read_yaml(text: str) -> Located:
    """Parse one YAML document into data and positions."""
    out = Located(data=None)
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                raise SourceError(1, 1, "expected a mapping, got an empty document")
            out.data = _YamlBuilder(loader, out).build(node, (), 0, frozenset())
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise SourceError(line, col, f"invalid YAML: {e.problem or e.context}") from e
    except yaml.YAMLError as e:
        raise SourceError(1, 1, f"invalid YAML: {e}") from e
    except RecursionError as e:
        raise SourceError(1, 1, "nesting too deep") from e
    return out


# --------------------------------------------------------------------------- TOML

_TOML_POS = re.compile(r"\(at line (\d+), column (\d+)\)")
_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*(\]\]?)\s*(#.*)?$")
_KEY = re.compile(
    r'\s*((?:"[^"]*"|\'[^\']*\'|[A-Za-z0-9_-]+)(?:\s*\.\s*(?:"[^"]*"|\'[^\']*\'|[A-Za-z0-9_-]+))*)\s*='
)


def _split_key(text: str) -> list[str]:
    parts = re.findall(r'"([^"]*)"|\'([^\']*)\'|([A-Za-z0-9_-]+)', text)
    return [a or b or c for a, b, c in parts]


class _TomlScanner:
    """Line scanner recording key positions; approximate inside inline tables and arrays."""

    def __init__(self, out: Located) -> None:
        self.out = out
        self.table: Path_ = ()
        self.array_counts: dict[Path_, int] = {}
        self.open_array: Path_ | None = None
        self.array_index = -1
        self.depth = 0

    def scan(self, text: str) -> None:
        in_multiline: str | None = None
        for lineno, line in enumerate(text.splitlines(), start=1):
            if in_multiline is not None:
                if in_multiline in line:
                    in_multiline = None
                continue
            for quote in ('"""', "'''"):
                if line.count(quote) % 2 == 1:
                    in_multiline = quote
            self._line(lineno, line)

    def _line(self, lineno: int, line: str) -> None:
        if self.open_array is not None:
            self._array_line(lineno, line)
            return
        header = _HEADER.match(line)
        if header and header.group(1) == header.group(3)[::-1].replace("]", "["):
            self._header(lineno, line, header)
            return
        match = _KEY.match(line)
        if match is None:
            return
        keys = _split_key(match.group(1))
        path = (*self.table, *keys)
        col = match.start(1) + 1
        self.out.keys[path] = (lineno, col)
        rest = line[match.end() :]
        self.out.values[path] = (lineno, match.end() + 1 + len(rest) - len(rest.lstrip()))
        self._inline(lineno, line, match.end(), path)
        opened = rest.count("[") - rest.count("]")
        if rest.lstrip().startswith("[") and opened > 0:
            self.open_array, self.array_index, self.depth = path, -1, opened

    def _header(self, lineno: int, line: str, header: re.Match[str]) -> None:
        keys: Path_ = tuple(_split_key(header.group(2)))
        col = header.start(2) + 1
        if header.group(1) == "[[":
            index = self.array_counts.get(keys, 0)
            self.array_counts[keys] = index + 1
            self.out.values.setdefault(keys, (lineno, col))
            self.table = (*keys, index)
        else:
            self.table = self._resolve(keys)
        self.out.keys[self.table] = (lineno, col)
        self.out.values.setdefault(self.table, (lineno, col))

    def _resolve(self, keys: Path_) -> Path_:
        # [layers.scope] after [[layers]] refers to the latest element of layers.
        for cut in range(len(keys), 0, -1):
            prefix = keys[:cut]
            if prefix in self.array_counts:
                return (*prefix, self.array_counts[prefix] - 1, *self._resolve(keys[cut:]))
        return keys

    def _array_line(self, lineno: int, line: str) -> None:
        assert self.open_array is not None
        stripped = line.lstrip()
        if stripped.startswith("{") or (stripped and stripped[0] not in "]#"):
            self.array_index += 1
            item = (*self.open_array, self.array_index)
            self.out.values[item] = (lineno, len(line) - len(stripped) + 1)
            self._inline(lineno, line, 0, item)
        self.depth += line.count("[") - line.count("]")
        if self.depth <= 0:
            self.open_array = None

    def _inline(self, lineno: int, line: str, start: int, path: Path_) -> None:
        brace = line.find("{", start)
        if brace < 0:
            return
        for match in re.finditer(r"[{,]\s*([A-Za-z0-9_-]+)\s*=\s*", line[brace:]):
            key = (*path, match.group(1))
            self.out.keys[key] = (lineno, brace + match.start(1) + 1)
            self.out.values[key] = (lineno, brace + match.end() + 1)


def read_toml(text: str) -> Located:
    """Parse a TOML document into data and (approximate but line-exact) positions."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        found = _TOML_POS.search(str(e))
        line, col = (int(found.group(1)), int(found.group(2))) if found else (1, 1)
        message = _TOML_POS.sub("", str(e)).strip()
        raise SourceError(line, col, f"invalid TOML: {message}") from e
    except RecursionError as e:
        raise SourceError(1, 1, "nesting too deep") from e
    out = Located(data=_plain(data))
    _TomlScanner(out).scan(text)
    return out


def _plain(value: Any) -> Any:
    """TOML datetimes become ISO strings so both formats validate the same way."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "isoformat") and not isinstance(value, str | int | float | bool):
        return value.isoformat()
    return value
