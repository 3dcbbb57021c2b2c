"""Simulated users giving feedback of one kind: situations of the world turned into events.

A :class:`~layerfed.simulation.world.Situation` holds a prompt, the answer the user
wants and the one they do not. :func:`feedback_events` turns a round's situations
into :mod:`layerfed.clients.events` of the user's kind (thumbs, preference, marks,
redo, alternative, contrast), after the user's reinforcement schedule picks which
opportunities are reinforced, their unreliability flips some judgements, and cue
randomisation varies the context. :func:`supervised_examples` is the plain path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from layerfed.clients.cues import CueRandomiser
from layerfed.clients.events import (
    Alternative,
    Contrast,
    FeedbackEvent,
    Marks,
    Preference,
    Redo,
    Span,
    Thumbs,
)
from layerfed.clients.schedules import from_spec
from layerfed.simulation.scenario import UserSpec
from layerfed.simulation.world import COMPLY, CUES, REFUSE, STYLES, Example, Situation

__all__ = [
    "FEEDBACK_KINDS",
    "TokenId",
    "attack_size",
    "feedback_events",
    "first_difference",
    "randomise_cues",
    "supervised_examples",
]

FEEDBACK_KINDS = ("examples", "thumbs", "preference", "marks", "redo", "alternative", "contrast")
TokenId = Callable[[str], int]
"""Word -> token id (the tokenizer's ``convert_tokens_to_ids``)."""

_MISDIRECT = (COMPLY, REFUSE, "safe", "harm", "help", "instead", "not")


def attack_size(user: UserSpec, round_: int, rng: np.random.Generator) -> int:
    """Adversarial examples ``user`` gives in ``round_`` (0: none).

    A turkey gives its burst at its burst round; a drip user attacks with chance ``drip``
    (one draw from ``rng``, the instance's generator for the round) with its usual count.
    """
    if user.kind == "turkey":
        return user.burst if round_ == user.burst_round else 0
    if user.kind == "drip" and rng.random() < user.drip:
        return user.examples
    return 0


def first_difference(right: str, wrong: str) -> int:
    """Index of the first word where two answers differ (their length if one extends the other)."""
    a, b = right.split(), wrong.split()
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def randomise_cues(
    situations: Sequence[Situation], p: float, rng: np.random.Generator
) -> list[Situation]:
    """Vary each prompt's context words (never its request's words) with probability ``p``.

    Context words are replaced by or interleaved with training-family words, misdirecting
    words are inserted and the context is shuffled; the request keeps its words and order.
    """
    if p <= 0:
        return list(situations)
    randomiser = CueRandomiser(
        CUES, p_context=p, p_misdirect=p / 2, seed=rng, misdirect=_MISDIRECT, p_shuffle=p / 2
    )

    def vary(prompt: str | None, protected: tuple[str, ...]) -> str | None:
        if prompt is None:
            return None
        return randomiser.apply(prompt, protected=protected or prompt.split()[-1:])

    out = []
    for s in situations:
        prompt = vary(s.prompt, s.protected)
        assert prompt is not None
        swapped = [w for w in (s.twin or "").split() if w not in s.prompt.split()]
        twin = vary(s.twin, (*s.protected, *swapped))
        out.append(Situation(prompt, s.right, s.wrong, s.red_line, twin, s.protected))
    return out


def _judged(s: Situation, reliability: float, rng: np.random.Generator) -> Situation:
    """The situation as the user sees it: right and wrong swapped with chance 1 - reliability."""
    if reliability < 1.0 and rng.random() > reliability:
        return Situation(s.prompt, s.wrong, s.right, s.red_line, s.twin, s.protected)
    return s


def supervised_examples(
    situations: Sequence[Situation], reliability: float, rng: np.random.Generator
) -> list[Example]:
    """The plain path: the wanted answer as a supervised example."""
    return [Example(s.prompt, _judged(s, reliability, rng).right) for s in situations]


def _span(response: str, word_index: int, valence: int) -> Span:
    words = response.split()
    index = min(word_index, len(words) - 1)
    start = len(" ".join(words[:index])) + (1 if index else 0)
    return Span(start=start, end=start + len(words[index]), valence=1 if valence > 0 else -1)


def _alternative(s: Situation, token_id: TokenId, rng: np.random.Generator) -> FeedbackEvent:
    at = first_difference(s.right, s.wrong)
    right, wrong = s.right.split(), s.wrong.split()
    if at >= min(len(right), len(wrong)):
        return Preference(prompt=s.prompt, chosen=s.right, rejected=s.wrong)
    chosen, sampled = token_id(right[at]), token_id(wrong[at])
    others = [token_id(w) for w in (*STYLES, COMPLY, REFUSE) if w not in (right[at], wrong[at])]
    extra = [others[int(i)] for i in rng.choice(len(others), size=3, replace=False)]
    candidates = tuple(dict.fromkeys([sampled, chosen, *extra]))
    return Alternative(
        prompt=s.prompt,
        response=s.wrong,
        position=at,
        chosen_token=chosen,
        candidates=candidates,
        response_ids=tuple(token_id(w) for w in wrong),
    )


def _event(
    kind: str, s: Situation, token_id: TokenId, rng: np.random.Generator
) -> list[FeedbackEvent]:
    if kind == "contrast" and s.twin is not None:
        at = first_difference(s.right, s.wrong)
        lead = " ".join(s.right.split()[:at])
        tail = f" {lead}" if lead else ""
        return [
            Contrast(
                positive_prompt=s.prompt + tail,
                negative_prompt=s.twin + tail,
                behaviour=s.right.split()[at],
            )
        ]
    if kind == "thumbs":
        good = bool(rng.random() < 0.5)
        return [Thumbs(prompt=s.prompt, response=s.right if good else s.wrong, up=good)]
    if kind == "marks":
        good = bool(rng.random() < 0.5)
        response = s.right if good else s.wrong
        span = _span(response, first_difference(s.right, s.wrong), 1 if good else -1)
        return [Marks(prompt=s.prompt, response=response, spans=(span,))]
    if kind == "redo":
        return [Redo(prompt=s.prompt, original=s.wrong, corrected=s.right)]
    if kind == "alternative":
        return [_alternative(s, token_id, rng)]
    return [Preference(prompt=s.prompt, chosen=s.right, rejected=s.wrong)]


def feedback_events(
    kind: str,
    situations: Sequence[Situation],
    rng: np.random.Generator,
    token_id: TokenId,
    *,
    reliability: float = 1.0,
    schedule: str = "continuous",
) -> list[FeedbackEvent]:
    """Events of ``kind`` for the opportunities the schedule reinforces (at least one).

    ``contrast`` turns a red-line situation and its near-miss twin into one contrast
    pair (the near-miss situation beside it is then skipped); other situations fall
    back to preferences, as a contrast needs a cue that must not elicit the behaviour.
    """
    if kind not in FEEDBACK_KINDS or kind == "examples":
        raise ValueError(f"kind: expected one of {FEEDBACK_KINDS[1:]}, got {kind!r}")
    chosen = _scheduled(situations, schedule, rng)
    if kind == "contrast":
        twins = {s.twin for s in chosen if s.twin is not None}
        chosen = [s for s in chosen if s.twin is not None or s.prompt not in twins]
    events: list[FeedbackEvent] = []
    for s in chosen:
        events += _event(kind, _judged(s, reliability, rng), token_id, rng)
    return events


def _scheduled(
    situations: Sequence[Situation], schedule: str, rng: np.random.Generator
) -> list[Situation]:
    plan = from_spec(schedule, rng)
    chosen = [s for s in situations if plan.reinforce()]
    return chosen or list(situations[:1])
