"""Long fuzzing (10,000 examples each) of the two decoders that read untrusted bytes.

The policy loader and the update-envelope decoder may refuse anything, but only
with the typed error family: ``PolicyError`` diagnostics from the loader,
``UpdateRejected`` from the envelope decoder, and a result object (never an
exception) from ``check_update`` on whatever the decoder let through.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_helpers import default_data
from round_helpers import CREATOR, Harness, policy

from layerfed.governance.envelope import (
    UpdateEnvelope,
    UpdateRejected,
    check_update,
    envelope_from_bytes,
    envelope_from_dict,
    envelope_to_bytes,
    envelope_to_dict,
)
from layerfed.governance.errors import PolicyError
from layerfed.governance.loader import parse_policy_bytes
from layerfed.governance.schema import Policy

pytestmark = pytest.mark.slow

LONG = settings(
    max_examples=10_000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DEFAULT = default_data()

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=24),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=5,
)
flat_values = st.one_of(scalars, st.lists(scalars, max_size=3))
"""What a Flower ConfigRecord can hold: scalars and lists of them."""


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += _paths(value, (*prefix, index))
    return [p for p in out if p]


def _mutate(data: Any, edits: list[tuple[tuple[Any, ...], Any, bool]]) -> Any:
    data = copy.deepcopy(data)
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
    return data


def _splice(raw: bytes, at: int, cut: int, insert: bytes) -> bytes:
    at = at % (len(raw) + 1)
    return raw[:at] + insert + raw[at + cut :]


# -- policy loader --------------------------------------------------------------------

POLICY_PATHS = _paths(DEFAULT)
POLICY_TOML = tomli_w.dumps(DEFAULT).encode()
policy_edits = st.lists(
    st.tuples(st.sampled_from(POLICY_PATHS), values, st.booleans()), min_size=1, max_size=3
)


def _toml(data: Any) -> bytes:
    try:
        return tomli_w.dumps(data).encode()
    except (TypeError, ValueError):
        return POLICY_TOML


policy_documents = st.one_of(
    st.tuples(st.binary(max_size=300), st.sampled_from(["yaml", "toml"])),
    st.tuples(
        st.builds(
            _splice,
            st.just(POLICY_TOML),
            st.integers(0, 10**6),
            st.integers(0, 40),
            st.binary(max_size=20),
        ),
        st.just("toml"),
    ),
    st.tuples(st.builds(lambda e: _toml(_mutate(DEFAULT, e)), policy_edits), st.just("toml")),
)


@LONG
@given(policy_documents)
def test_policy_loader_long_fuzz(document: tuple[bytes, str]) -> None:
    """Random, spliced and mutated policy documents yield PolicyError or diagnostics only."""
    raw, fmt = document
    try:
        result = parse_policy_bytes(raw, file="fuzz", fmt=fmt)
    except PolicyError:
        return
    assert result.policy is None or isinstance(result.policy, Policy)
    for diagnostic in result.diagnostics:
        assert diagnostic.line >= 1 and diagnostic.column >= 1


# -- update envelope decoder ----------------------------------------------------------


def _genuine() -> tuple[UpdateEnvelope, dict[str, np.ndarray[Any, Any]]]:
    h = Harness(Path(tempfile.mkdtemp(prefix="layerfed-fuzz-")))
    h.task(1, CREATOR)
    arrays = h.arrays(CREATOR, seed=1)
    message = h.reply(1, arrays)
    items = dict(message.content.config_records["lf.envelope"])
    return envelope_from_dict(items), arrays


GENUINE, ARRAYS = _genuine()
GENUINE_BYTES = envelope_to_bytes(GENUINE)
GENUINE_DICT = json.loads(GENUINE_BYTES)
GENUINE_FLAT = envelope_to_dict(GENUINE)
ENVELOPE_PATHS = _paths(GENUINE_DICT)
envelope_edits = st.lists(
    st.tuples(st.sampled_from(ENVELOPE_PATHS), values, st.booleans()), min_size=1, max_size=3
)


def _dumps(data: Any) -> bytes:
    return json.dumps(data, allow_nan=True).encode()


envelope_bytes = st.one_of(
    st.binary(max_size=400),
    st.builds(
        _splice,
        st.just(GENUINE_BYTES),
        st.integers(0, 10**6),
        st.integers(0, 30),
        st.binary(max_size=30),
    ),
    st.builds(lambda e: _dumps(_mutate(GENUINE_DICT, e)), envelope_edits),
    st.builds(_dumps, values),
)


def _accepts_only_typed(decode: Any, data: Any) -> None:
    try:
        envelope = decode(data)
    except UpdateRejected as e:
        assert e.reason == "malformed"
        return
    assert isinstance(envelope, UpdateEnvelope)
    check = check_update(envelope, ARRAYS, policy(), run_id=GENUINE.run_id, round=GENUINE.round)
    assert check.ok == (envelope == GENUINE)


@LONG
@given(envelope_bytes)
def test_envelope_bytes_long_fuzz(data: bytes) -> None:
    """Random, spliced and mutated envelope bytes: UpdateRejected or a checkable envelope."""
    _accepts_only_typed(envelope_from_bytes, data)


flat_items = st.dictionaries(
    st.one_of(st.sampled_from(sorted(GENUINE_FLAT)), st.text(max_size=30)),
    flat_values,
    max_size=6,
)


@LONG
@given(flat_items, st.booleans())
def test_envelope_record_long_fuzz(changes: dict[str, Any], keep: bool) -> None:
    """A config record with fields replaced, dropped or added decodes or fails typed."""
    items: dict[str, Any] = {**GENUINE_FLAT, **changes} if keep else dict(changes)
    _accepts_only_typed(envelope_from_dict, items)


def test_genuine_envelope_decodes_and_verifies() -> None:
    """The fuzzers' seed envelope is genuine: it round-trips and verifies."""
    assert envelope_from_bytes(GENUINE_BYTES) == GENUINE
    assert envelope_from_dict(GENUINE_FLAT) == GENUINE
    assert check_update(GENUINE, ARRAYS, policy(), run_id=GENUINE.run_id, round=GENUINE.round).ok
