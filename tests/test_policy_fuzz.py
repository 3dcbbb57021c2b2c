"""Fuzzing the policy loader: whatever the bytes, only the typed error family escapes."""

from __future__ import annotations

import copy
from typing import Any

import tomli_w
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_helpers import default_data

from layerfed.governance.errors import PolicyError
from layerfed.governance.loader import parse_policy_bytes
from layerfed.governance.schema import Policy

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEFAULT = default_data()

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _check(raw: bytes, fmt: str) -> None:
    try:
        result = parse_policy_bytes(raw, file="fuzz", fmt=fmt)
    except PolicyError:
        return
    assert result.policy is None or isinstance(result.policy, Policy)
    for diagnostic in result.diagnostics:
        assert diagnostic.line >= 1 and diagnostic.column >= 1


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["yaml", "toml"]))
def test_random_bytes_never_escape(raw: bytes, fmt: str) -> None:
    """Random bytes yield diagnostics, never an untyped exception."""
    _check(raw, fmt)


@FUZZ
@given(st.text(alphabet=st.sampled_from(list(":-[]{}&*!|>'\"#%@`,?\n\t abc0123=.")), max_size=200))
def test_random_syntax_never_escapes(text: str) -> None:
    """Text made of YAML and TOML punctuation is handled as data."""
    _check(text.encode(), "yaml")
    _check(text.encode(), "toml")


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += _paths(value, (*prefix, index))
    return out


PATHS = [p for p in _paths(DEFAULT) if p]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(PATHS), values, st.booleans()), min_size=1, max_size=4))
def test_mutated_default_documents_never_escape(edits: list[tuple[Any, Any, bool]]) -> None:
    """The default policy with fields replaced or deleted at random yields typed errors only."""
    data = copy.deepcopy(DEFAULT)
    for path, value, delete in edits:
        node: Any = data
        try:
            for part in path[:-1]:
                node = node[part]
            if delete:
                del node[path[-1]]
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    _check(yaml.safe_dump(data).encode(), "yaml")
    try:
        toml_text = tomli_w.dumps(data)
    except (TypeError, ValueError):
        return
    _check(toml_text.encode(), "toml")
