"""The gym's built-in probe suites, registered as ``layerfed.probe_suites`` entry points.

A policy names them as ``builtin:red_line_refusals`` and ``builtin:near_misses``;
:mod:`layerfed.layers.probes` finds them through the entry points in pyproject.toml,
so nothing below the gym imports it. The prompts are the world's
(:func:`~layerfed.simulation.world.builtin_suite`, probe cues) and end where the
world's decisive answer token comes, so the continuations are the single tokens
:data:`~layerfed.simulation.world.REFUSE` (``sorry``) and
:data:`~layerfed.simulation.world.COMPLY` (``sure``). Longer ones would let a
style-trained layer, which lowers ``p(here | sure)``, look like it improves red-line
refusals to the probe veto.

``builtin:red_line_refusals_wide`` (issue #23) is a wider red-line suite for the
projection's basis: the same red lines in every paraphrase frame, with 0-3 cues from
every family but the evaluation ones (:data:`~layerfed.simulation.lexicon.WIDE_PROBE_FAMILIES`),
so that the span of its activations covers more of the directions cue words use while
the gym's held-out prompts keep cue words no suite holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from layerfed.layers.probes import ProbePrompt, ProbeSuiteData
from layerfed.simulation import lexicon as lx
from layerfed.simulation.world import (
    COMPLY,
    FRAMES,
    REFUSE,
    builtin_suite,
    compose,
    cue_phrases,
    red_request,
)

__all__ = [
    "WIDE_SEED",
    "WIDE_SIZE",
    "near_misses",
    "red_line_refusals",
    "red_line_refusals_wide",
    "wide_red_line_prompts",
]

WIDE_SIZE = 240
"""Prompts drawn for ``red_line_refusals_wide`` (5 times ``red_line_refusals``' 48)."""
WIDE_SEED = 23
"""Seed of ``red_line_refusals_wide``'s draw."""


def _suite(name: str) -> ProbeSuiteData:
    prompts = tuple(
        ProbePrompt(prompt, "refuse" if want == REFUSE else "comply")
        for prompt, want in builtin_suite(name)
    )
    return ProbeSuiteData(name, prompts, refusal=REFUSE, compliance=COMPLY)


def red_line_refusals() -> ProbeSuiteData:
    """Red-line prompts with probe cues; each must be refused (``sorry``)."""
    return _suite("red_line_refusals")


def near_misses() -> ProbeSuiteData:
    """The red-line prompts' twins, one word away; each must be answered (``sure``)."""
    return _suite("near_misses")


def wide_red_line_prompts(
    size: int = WIDE_SIZE,
    seed: int = WIDE_SEED,
    families: Sequence[str] = lx.WIDE_PROBE_FAMILIES,
) -> list[str]:
    """``size`` red-line prompts (duplicates dropped), each paraphrase frame in turn, with 0-3
    cue phrases from distinct ``families`` placed before or after the request; each ends
    where the decisive token comes (the frame's acknowledgement appended, if any).

    Raises ValueError if ``families`` names an evaluation family or an unknown one.
    """
    bad = [f for f in families if f in lx.EVAL_FAMILIES or f not in lx.CUE_FAMILIES]
    if bad:
        raise ValueError(
            f"families: expected cue families outside the evaluation ones "
            f"{lx.EVAL_FAMILIES}, got {bad}"
        )
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for i in range(size):
        frame = FRAMES[i % len(FRAMES)]
        k = int(rng.integers(0, 4))
        cues = cue_phrases(rng, families, k) if k else []
        split = int(rng.integers(0, len(cues) + 1))
        tail = f" {frame.ack}" if frame.ack else ""
        out.append(compose(red_request(rng), frame, cues, split) + tail)
    return list(dict.fromkeys(out))


def red_line_refusals_wide() -> ProbeSuiteData:
    """Red-line prompts with cues from every non-evaluation family; each must be refused."""
    prompts = tuple(ProbePrompt(p, "refuse") for p in wide_red_line_prompts())
    return ProbeSuiteData("red_line_refusals_wide", prompts, refusal=REFUSE, compliance=COMPLY)
