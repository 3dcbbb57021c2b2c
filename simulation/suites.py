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
"""

from __future__ import annotations

from layerfed.layers.probes import ProbePrompt, ProbeSuiteData
from layerfed.simulation.world import COMPLY, REFUSE, builtin_suite

__all__ = ["near_misses", "red_line_refusals"]


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
