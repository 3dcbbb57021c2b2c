"""Load a policy file (YAML or TOML) into a :class:`Policy`, with located errors.

Every problem becomes a :class:`Diagnostic` reading
``FILE:LINE:COL: error: <field path>: <expected>, got <found>``; several are
reported at once where possible, and only :class:`PolicyError` ever escapes.
"""

from __future__ import annotations

import difflib
import logging
import types
import typing
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from layerfed.governance.errors import (
    Diagnostic,
    PolicyLoadError,
    PolicySemanticError,
)
from layerfed.governance.lint import did_you_mean, key_issues, limit_issues, lookalike_issues
from layerfed.governance.schema import DEFAULT_LAYERS, DURATION_PATTERN, Policy
from layerfed.governance.semantics import Issue, semantic_issues
from layerfed.governance.sources import Located, Path_, SourceError, read_toml, read_yaml
from layerfed.governance.yaml11 import ambiguous_scalars

__all__ = ["CheckResult", "check_policy_file", "format_path", "load_policy", "parse_policy_text"]

log = logging.getLogger("layerfed")
MAX_BYTES = 4 * 1024 * 1024
_FORMATS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml"}


def format_path(path: Iterable[str | int]) -> str:
    """``("layers", 0, "scope")`` -> ``layers[0].scope``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class CheckResult(typing.NamedTuple):
    """Outcome of checking a file: the policy when it parsed, and every diagnostic."""

    policy: Policy | None
    diagnostics: list[Diagnostic]

    @property
    def ok(self) -> bool:
        """True when no diagnostic is an error."""
        return not any(d.severity == "error" for d in self.diagnostics)


def load_policy(
    path: str | Path, *, now: datetime | None = None, model_params: list[str] | None = None
) -> Policy:
    """Read, validate and semantically check a policy file; raise :class:`PolicyError`."""
    result = check_policy_file(path, now=now, model_params=model_params)
    errors = [d for d in result.diagnostics if d.severity == "error"]
    if result.policy is None:
        raise PolicyLoadError(errors)
    if errors:
        raise PolicySemanticError(errors)
    log.info("loaded policy %s version %s from %s", result.policy.name, result.policy.version, path)
    return result.policy


def check_policy_file(
    path: str | Path, *, now: datetime | None = None, model_params: list[str] | None = None
) -> CheckResult:
    """Every diagnostic for a policy file; never raises for bad content."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()[: MAX_BYTES + 1]
    except OSError as e:
        reason = e.strerror or type(e).__name__
        return CheckResult(None, [_diag(file, 1, 1, "", f"expected a readable file, got {reason}")])
    fmt = _FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        got = Path(path).suffix or "no extension"
        msg = f"expected a .yaml, .yml or .toml file, got {got}"
        return CheckResult(None, [_diag(file, 1, 1, "", msg)])
    root = Path(path).absolute().parent
    return parse_policy_bytes(
        raw, file=file, fmt=fmt, now=now, model_params=model_params, source_dir=root
    )


def parse_policy_text(text: str, *, file: str = "<policy>", fmt: str = "yaml") -> Policy:
    """Parse and check policy text; raise :class:`PolicyError` (used by tests and tools)."""
    result = parse_policy_bytes(text.encode("utf-8"), file=file, fmt=fmt)
    errors = [d for d in result.diagnostics if d.severity == "error"]
    if result.policy is None:
        raise PolicyLoadError(errors)
    if errors:
        raise PolicySemanticError(errors)
    return result.policy


def parse_policy_bytes(
    raw: bytes,
    *,
    file: str,
    fmt: str,
    now: datetime | None = None,
    model_params: list[str] | None = None,
    source_dir: Path | None = None,
) -> CheckResult:
    """Decode, parse, validate and check policy bytes.

    ``source_dir`` is the folder relative probe-suite paths resolve against (the
    policy file's folder; default the current directory): see ``Policy.source_dir``.
    """
    if len(raw) > MAX_BYTES:
        msg = f"expected at most {MAX_BYTES} bytes, got more"
        return CheckResult(None, [_diag(file, 1, 1, "", msg)])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        msg = f"expected UTF-8 text, got byte 0x{raw[e.start]:02x}"
        return CheckResult(None, [_diag(file, line, col, "", msg)])
    try:
        located = read_yaml(text) if fmt == "yaml" else read_toml(text)
    except SourceError as e:
        return CheckResult(None, [_diag(file, e.line, e.column, "", e.message)])
    if not isinstance(located.data, dict):
        got = type(located.data).__name__
        msg = f"expected a mapping of policy fields, got {got}"
        return CheckResult(None, [_diag(file, 1, 1, "", msg)])
    early = _source_diagnostics(text, fmt, located, file)
    try:
        policy = Policy.model_validate(located.data)
    except ValidationError as e:
        flagged = {d.path for d in early}
        schema = [d for d in _schema_diagnostics(e, located, file) if d.path not in flagged]
        return CheckResult(None, _sorted(early + schema))
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        return CheckResult(None, [_diag(file, 1, 1, "", f"expected a valid policy, got {e}")])
    if source_dir is not None:
        policy = policy.with_source_dir(source_dir)
    issues = semantic_issues(policy, now=now, model_params=model_params)
    issues += key_issues(policy) + limit_issues(policy)
    return CheckResult(policy, early + [_locate(issue, located, file) for issue in issues])


def _source_diagnostics(text: str, fmt: str, located: Located, file: str) -> list[Diagnostic]:
    """Problems in the document itself: YAML 1.1/1.2 traps and look-alike characters."""
    out = []
    if fmt == "yaml":
        for trap in ambiguous_scalars(text):
            out.append(_diag(file, trap.line, trap.column, format_path(trap.path), trap.message))
    out += [_locate(issue, located, file) for issue in lookalike_issues(located.data)]
    return _sorted(out)


def _sorted(diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    return sorted(diagnostics, key=lambda d: (d.line, d.column, d.path))


def _diag(file: str, line: int, col: int, path: str, message: str) -> Diagnostic:
    return Diagnostic(file=file, line=line, column=col, path=path, message=message)


def _locate(issue: Issue, located: Located, file: str) -> Diagnostic:
    line, col = located.position(issue.path)
    message = did_you_mean(issue.message)
    return Diagnostic(file, line, col, format_path(issue.path), message, issue.severity)


# --------------------------------------------------------------------------- schema errors


def _schema_diagnostics(error: ValidationError, located: Located, file: str) -> list[Diagnostic]:
    grouped: dict[tuple[Path_, str], list[str]] = {}
    got_by: dict[tuple[Path_, str], str] = {}
    for err in error.errors(include_url=False):
        path = _data_path(tuple(err["loc"]), located.data, err["type"])
        if err["type"] == "union_tag_invalid":
            path = (*path, "kind")
        kind = err["type"] if err["type"] in ("missing", "extra_forbidden") else "value"
        key = (path, kind)
        grouped.setdefault(key, []).append(_expected(err, path))
        got_by[key] = _got(err)
    out = []
    for (path, kind), expected in grouped.items():
        unique = list(dict.fromkeys(expected))
        message = f"expected {' or '.join(unique)}, got {got_by[(path, kind)]}"
        if kind == "missing":
            line, col = located.position(path[:-1], key=True)
        else:
            line, col = located.position(path, key=kind == "extra_forbidden")
        out.append(_diag(file, line, col, format_path(path), message))
    return sorted(out, key=lambda d: (d.line, d.column, d.path))


def _has(node: Any, part: str | int) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def _data_path(loc: Path_, data: Any, kind: str) -> Path_:
    """Drop pydantic's union and validator tags so the path follows the document."""
    path: list[str | int] = []
    current = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if _has(current, part):
            current = current[part]
            path.append(part)
        elif last and kind in ("missing", "extra_forbidden"):
            path.append(part)
    return tuple(path)


def _expected(err: Any, path: Path_) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "missing":
        field = path[-1] if path else "?"
        if len(path) >= 2 and path[0] == "layers" and field in ("rank", "slot_key", "memories"):
            known = ", ".join(DEFAULT_LAYERS)
            return f"field '{field}' (required for layers not named {known})"
        return f"field '{field}'"
    if kind == "extra_forbidden":
        return _known_fields_hint(path)
    simple = {
        "int_type": "an integer",
        "int_parsing": "an integer",
        "int_from_float": "an integer",
        "float_type": "a number",
        "float_parsing": "a number",
        "bool_type": "true or false",
        "bool_parsing": "true or false",
        "string_type": "a string",
        "dict_type": "a mapping",
        "model_type": "a mapping",
        "model_attributes_type": "a mapping",
        "list_type": "a list",
        "timezone_aware": "a date-time with a time zone (e.g. 2030-01-01T00:00:00Z)",
        "union_tag_not_found": "a mapping with a 'kind' field",
        "finite_number": "a finite number",
    }
    if kind in simple:
        return simple[kind]
    if kind.startswith("datetime"):
        return "an ISO 8601 date-time with a time zone (e.g. 2030-01-01T00:00:00Z)"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<"}
    bounds["less_than_equal"] = "<="
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        return f"a number {bounds[kind]} {limit}"
    if kind in ("too_short", "too_long"):
        word = "at least" if kind == "too_short" else "at most"
        count = ctx.get("min_length", ctx.get("max_length"))
        return f"{word} {count} item(s)"
    if kind in ("string_too_short", "string_too_long"):
        word = "at least" if kind == "string_too_short" else "at most"
        count = ctx.get("min_length", ctx.get("max_length"))
        return f"a string of {word} {count} character(s)"
    if kind == "string_pattern_mismatch":
        if ctx.get("pattern") == DURATION_PATTERN:
            return "a duration like '90s', '30m', '6h' or '2d'"
        return f"a string matching {ctx.get('pattern')}"
    if kind == "literal_error":
        return f"one of {ctx.get('expected')}"
    if kind == "union_tag_invalid":
        return f"a 'kind' of {ctx.get('expected_tags')}"
    if kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    return str(err["msg"])


def _got(err: Any) -> str:
    if err["type"] == "missing":
        return "nothing"
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        return f"unknown field '{err['loc'][-1]}'"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _known_fields_hint(path: Path_) -> str:
    fields = sorted(_fields_at(path[:-1]))
    name = str(path[-1]) if path else ""
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if close:
        return f"a known field (did you mean '{close[0]}'?)"
    return f"one of the known fields {', '.join(fields)}"


def _fields_at(path: Path_) -> set[str]:
    """Field names of the schema model(s) at a document path."""
    candidates: list[Any] = [Policy]
    for part in path:
        nxt: list[Any] = []
        for tp in candidates:
            nxt.extend(_step(tp, part))
        candidates = nxt
    names: set[str] = set()
    for tp in candidates:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            names.update(tp.model_fields)
    return names


def _members(tp: Any) -> list[Any]:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _members(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    return [tp]


def _step(tp: Any, part: str | int) -> list[Any]:
    out: list[Any] = []
    for member in _members(tp):
        origin = typing.get_origin(member)
        if isinstance(part, int) and origin is list:
            out.extend(_members(typing.get_args(member)[0]))
        elif isinstance(member, type) and issubclass(member, BaseModel) and isinstance(part, str):
            field = member.model_fields.get(part)
            if field is not None:
                out.extend(_members(field.annotation))
    return out
