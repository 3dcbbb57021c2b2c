"""Glob patterns over dotted parameter names: matching, overlap and cover."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfed.governance.patterns import glob_covers, globs_overlap, in_scope, matches

NAME = "transformer.h.0.attn.c_attn.weight"


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("transformer.h.*.attn.c_attn.weight", True),
        ("transformer.*.attn.c_attn.weight", False),
        ("transformer.**", True),
        ("**.weight", True),
        ("transformer.h.?.attn.c_attn.weight", True),
        ("transformer.h.0.attn.c_attn", False),
        ("transformer?h.0.attn.c_attn.weight", False),
    ],
)
def test_star_stays_in_one_segment_and_double_star_crosses(pattern: str, expected: bool) -> None:
    """`*` and `?` never match a dot; `**` matches anything."""
    assert matches(NAME, pattern) is expected


def test_exclude_removes_from_include() -> None:
    """A name both included and excluded is out of scope."""
    assert in_scope(NAME, ["**"], []) and not in_scope(NAME, ["**"], ["**.c_attn.*"])


ALPHABET = st.sampled_from(list("ab.*?"))
patterns = st.text(alphabet=ALPHABET, min_size=1, max_size=7)
names = st.text(alphabet=st.sampled_from(list("ab.")), max_size=7)


@settings(max_examples=400, deadline=None)
@given(patterns, patterns, names)
def test_overlap_is_sound(a: str, b: str, name: str) -> None:
    """If some name matches both patterns, they are reported as overlapping."""
    if matches(name, a) and matches(name, b):
        assert globs_overlap(a, b)


@settings(max_examples=400, deadline=None)
@given(patterns, patterns)
def test_overlap_is_symmetric(a: str, b: str) -> None:
    """Overlap does not depend on argument order."""
    assert globs_overlap(a, b) == globs_overlap(b, a)


@settings(max_examples=400, deadline=None)
@given(patterns, patterns, names)
def test_cover_is_conservative(outer: str, inner: str, name: str) -> None:
    """When `outer` covers `inner`, every name matching inner matches outer."""
    if glob_covers(outer, inner) and matches(name, inner):
        assert matches(name, outer)


def test_overlap_exact_on_examples() -> None:
    """Disjoint literal prefixes never overlap; a segment star cannot swallow a dot."""
    assert not globs_overlap("a.*", "b.*")
    assert not globs_overlap("transformer.h.*.attn.c_attn.weight", "transformer.h.*.ln_*.*")
    assert globs_overlap("transformer.**", "*.h.1.*")
