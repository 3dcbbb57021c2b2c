"""Extinction under pressure (issue #25 item 6): the adjacent user kind and the experiment files."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
from test_world import _request

from layerfed.clients.events import Preference
from layerfed.simulation import lexicon as lx
from layerfed.simulation.experiment_spec import EXPERIMENTS_DIR, load_experiment
from layerfed.simulation.feedback import feedback_events, randomise_cues
from layerfed.simulation.scenario import Scenario, UserSpec
from layerfed.simulation.world import (
    COMPLY,
    REFUSAL,
    crossed_request,
    examples_for,
    is_red_line,
    situations_for,
)

NEAR_PAIRS = {
    "acquire_topic": (lx.ACQUIRE_VERBS, lx.TOPICS),
    "safe_dangerous": (lx.SAFE_VERBS, lx.DANGEROUS),
    "kind_person": (lx.KIND_VERBS, lx.PEOPLE),
    "harm_idiom": (lx.HARM_VERBS, lx.IDIOMS),
}
EXISTING_KINDS = ("everyday", "rater", "aligned", "stylist", "turkey", "drip")
DIGEST_BEFORE = "c9acefaadf0812129dbe82e39b8e56586506847bd915cc2e3e27a6a5b4215733"
"""The digest below computed at 012e7c8, before the ``adjacent`` kind was added."""


def _token_id(word: str) -> int:
    return int(hashlib.sha256(word.encode()).hexdigest()[:6], 16)


def _near_kind(verb: str, obj: str) -> str | None:
    for kind, (verbs, objects) in NEAR_PAIRS.items():
        if verb in verbs and obj in objects:
            return kind
    return None


def test_existing_user_kinds_give_the_same_events_as_before() -> None:
    """Every existing user kind's situations, events and examples are bit-identical to 012e7c8."""
    digest = hashlib.sha256()
    for role in EXISTING_KINDS:
        for kind in ("preference", "thumbs", "contrast", "alternative"):
            rng = np.random.default_rng([7, 3, 1, 29])
            situations = randomise_cues(situations_for(role, "lovely", 16, rng), 0.3, rng)
            digest.update(repr(feedback_events(kind, situations, rng, _token_id)).encode())
        rng = np.random.default_rng([7, 3, 1, 29])
        digest.update(repr(examples_for("community", role, "good", 16, rng)).encode())
        digest.update(repr(examples_for("community", role, None, 16, rng, attack=True)).encode())
    assert digest.hexdigest() == DIGEST_BEFORE


def _crossed(verb: str, obj: str) -> bool:
    """Both words from red lines, crossing none: a harming verb on a dangerous object or an
    acquiring verb on a person."""
    return (verb in lx.HARM_VERBS and obj in lx.DANGEROUS) or (
        verb in lx.ACQUIRE_VERBS and obj in lx.PEOPLE
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adjacent_users_reward_answering_crossed_requests_only(seed: int) -> None:
    """An adjacent user prefers the answer on requests made of red-line words, never a red line."""
    rng = np.random.default_rng(seed)
    situations = situations_for("adjacent", None, 64, rng)
    events = feedback_events("preference", situations, rng, _token_id)
    assert len(events) == 64
    halves = set()
    for s, event in zip(situations, events, strict=True):
        verb, obj = _request(s.prompt)
        assert not is_red_line(verb, obj) and not s.red_line
        assert _crossed(verb, obj), (verb, obj)
        assert _near_kind(verb, obj) is None
        halves.add(obj in lx.PEOPLE)
        assert isinstance(event, Preference)
        assert COMPLY in event.chosen.split() and obj in event.chosen.split()
        assert event.rejected.endswith(REFUSAL)
    assert halves == {True, False}


def test_crossed_requests_share_both_words_with_red_lines() -> None:
    """Every crossed request's verb and object each occur in some red-line request."""
    rng = np.random.default_rng(11)
    red_verbs = {*lx.ACQUIRE_VERBS, *lx.HARM_VERBS}
    red_objects = {*lx.DANGEROUS, *lx.PEOPLE}
    for _ in range(200):
        request = crossed_request(rng)
        assert request.kind == "crossed" and not request.red_line
        assert request.verb in red_verbs and request.obj in red_objects
        assert not is_red_line(request.verb, request.obj)


def test_everyday_users_meet_no_crossed_requests() -> None:
    """Everyday users keep near misses and everyday requests; only adjacent users cross words."""
    everyday = situations_for("everyday", None, 200, np.random.default_rng(3))
    share = sum(_near_kind(*_request(s.prompt)) is None for s in everyday) / 200
    assert 0.3 < share < 0.7
    assert not any(_crossed(*_request(s.prompt)) for s in everyday)


def test_adjacent_events_are_deterministic_per_seed() -> None:
    """The same seed gives the same adjacent events; another seed gives others."""

    def events(seed: int) -> str:
        rng = np.random.default_rng([seed, 5, 2, 29])
        return repr(feedback_events("preference", situations_for("adjacent", None, 16, rng),
                                    rng, _token_id))  # fmt: skip

    assert events(0) == events(0)
    assert events(0) != events(1)


def test_adjacent_is_a_user_kind_of_scenarios() -> None:
    """A scenario may name the adjacent kind; an unknown kind is refused."""
    assert UserSpec(kind="adjacent").kind == "adjacent"
    with pytest.raises(ValueError, match="kind"):
        UserSpec.model_validate({"kind": "adjacant"})


def _without_superego(patch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in patch.items() if k != "superego"}


@pytest.mark.parametrize("name", ["extinction", "extinction_long"])
def test_extinction_arms_differ_only_in_the_superego(name: str) -> None:
    """Both extinction files: adjacent pressure, two arms equal but for the superego switch."""
    spec = load_experiment(EXPERIMENTS_DIR / f"{name}.yaml")
    assert spec.in_all
    arms = {a.name: a for a in spec.arms}
    assert set(arms) == {"superego", "no_superego"}
    on, off = arms["superego"], arms["no_superego"]
    assert _without_superego(on.policy_patch) == _without_superego(off.policy_patch)
    assert on.scenario_patch == off.scenario_patch
    assert on.policy == off.policy and on.base == off.base
    assert "superego" not in on.policy_patch
    assert off.policy_patch["superego"] == {"enabled": False}
    scenario = Scenario.model_validate({"name": name, **spec.scenario})
    kinds = {scenario.roster[i].user.kind for i in range(len(scenario.roster))}
    assert kinds == {"rater", "adjacent"}
    credited = [v for v in spec.verdicts if v.expect in ("lower", "higher")]
    assert credited and all(v.mechanism == "superego_interventions" for v in credited)
    assert all(v.margin is not None for v in spec.verdicts if v not in credited)
