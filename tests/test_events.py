"""Feedback events: validation, typed errors naming the field, round trips."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from layerfed.clients.events import (
    Alternative,
    Contrast,
    InvalidFeedback,
    Marks,
    Preference,
    Redo,
    Span,
    Thumbs,
    parse_event,
)
from layerfed.errors import LayerfedError

VALID: list[dict[str, Any]] = [
    {"kind": "thumbs", "prompt": "p", "response": "r", "up": True},
    {"kind": "preference", "prompt": "p", "chosen": "a", "rejected": "b"},
    {
        "kind": "marks",
        "prompt": "p",
        "response": "abc",
        "spans": [{"start": 0, "end": 1, "valence": 1}],
    },
    {"kind": "redo", "prompt": "p", "original": "a b", "corrected": "a c", "first_wrong_token": 1},
    {
        "kind": "alternative",
        "prompt": "p",
        "response": "r s",
        "position": 1,
        "chosen_token": 7,
        "candidates": [5, 7],
        "response_ids": [4, 5],
    },
    {"kind": "contrast", "positive_prompt": "a", "negative_prompt": "b", "behaviour": "c"},
]
TYPES = [Thumbs, Preference, Marks, Redo, Alternative, Contrast]


@pytest.mark.parametrize(("data", "cls"), list(zip(VALID, TYPES, strict=True)))
def test_valid_events_parse_to_their_kind_and_round_trip(data: dict[str, Any], cls: type) -> None:
    """Each valid mapping parses to its kind's model, and its dump parses back to an equal event."""
    event = parse_event(data)
    assert isinstance(event, cls)
    assert parse_event(event.model_dump()) == event


def test_events_are_frozen() -> None:
    """Events cannot be changed after construction."""
    event = Thumbs(prompt="p", response="r", up=True)
    with pytest.raises(ValidationError):
        event.up = False  # type: ignore[misc]


def _error(data: dict[str, Any]) -> InvalidFeedback:
    with pytest.raises(InvalidFeedback) as err:
        parse_event(data)
    return err.value


@pytest.mark.parametrize(
    ("base", "change", "field"),
    [
        (0, {"prompt": ""}, "prompt"),
        (0, {"up": "maybe"}, "up"),
        (0, {"colour": "red"}, "colour"),
        (1, {"rejected": "a"}, "rejected"),
        (2, {"spans": [{"start": 0, "end": 9, "valence": 1}]}, "spans[0].end"),
        (2, {"spans": [{"start": 2, "end": 1, "valence": 1}]}, "spans[0].end"),
        (2, {"spans": [{"start": 0, "end": 1, "valence": 2}]}, "spans[0].valence"),
        (2, {"spans": []}, "spans"),
        (3, {"corrected": "a b"}, "corrected"),
        (3, {"first_wrong_token": -1}, "first_wrong_token"),
        (4, {"chosen_token": 9}, "chosen_token"),
        (4, {"chosen_token": 5}, "chosen_token"),  # the sampled token itself
        (4, {"position": 2}, "position"),
        (4, {"candidates": [7, 7]}, "candidates"),
        (5, {"negative_prompt": "a"}, "negative_prompt"),
        (0, {"kind": "wink"}, "kind"),
    ],
)
def test_invalid_events_raise_typed_errors_naming_the_field(
    base: int, change: dict[str, Any], field: str
) -> None:
    """Each invalid event raises InvalidFeedback (a LayerfedError) naming the offending field."""
    error = _error({**VALID[base], **change})
    assert isinstance(error, LayerfedError)
    assert error.field == field
    assert str(error).startswith(f"{field}: expected ")


def test_overlapping_spans_name_the_later_span() -> None:
    """Overlapping character spans are rejected, naming the span that starts inside another."""
    spans = [{"start": 2, "end": 4, "valence": 1}, {"start": 0, "end": 3, "valence": -1}]
    error = _error({**VALID[2], "response": "abcdef", "spans": spans})
    assert error.field == "spans[0].start"
    assert error.got == 2


def test_missing_field_says_nothing_was_got() -> None:
    """A missing required field is named, with 'got nothing' in the message."""
    data = dict(VALID[0])
    del data["up"]
    error = _error(data)
    assert error.field == "up" and str(error).endswith("got nothing")


def test_non_mapping_input_is_a_typed_error() -> None:
    """Input that is not a mapping raises InvalidFeedback, not a TypeError."""
    with pytest.raises(InvalidFeedback):
        parse_event(["thumbs"])  # type: ignore[arg-type]


def test_error_location_prefixes_the_message() -> None:
    """The 'where' of parse_event (file:line) leads the message and is kept on the error."""
    with pytest.raises(InvalidFeedback, match=r"^feedback.jsonl:3: prompt: ") as err:
        parse_event({**VALID[0], "prompt": ""}, where="feedback.jsonl:3")
    assert err.value.where == "feedback.jsonl:3"


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 10)), min_size=1, max_size=5))
def test_marks_accepts_exactly_the_disjoint_in_range_spans(raw: list[tuple[int, int]]) -> None:
    """Marks validates iff every span lies in the response and no two spans overlap."""
    response = "x" * 25
    spans = [{"start": s, "end": s + n, "valence": 1} for s, n in raw]
    ordered = sorted((s, s + n) for s, n in raw)
    ok = all(e <= len(response) for _, e in ordered) and all(
        a[1] <= b[0] for a, b in itertools.pairwise(ordered)
    )
    data = {"kind": "marks", "prompt": "p", "response": response, "spans": spans}
    if ok:
        assert isinstance(parse_event(data), Marks)
    else:
        with pytest.raises(InvalidFeedback):
            parse_event(data)


def test_span_model_checks_order_on_direct_construction() -> None:
    """Constructing a Span directly with end <= start fails validation."""
    with pytest.raises(ValidationError):
        Span(start=3, end=3, valence=1)
