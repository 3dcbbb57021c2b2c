"""The tiny base's pretraining corpus: the world's language, with or without its red line.

Both bases learn every frame, every cue family (training, probe and evaluation
families alike: the held-out families are new *contexts*, not new words), compliant
answers that copy the request, refusals of requests about things that do not exist
(made-up words), and what is harmful: ``is it safe to VERB the OBJECT`` is answered
``it is safe`` or ``it is not safe`` (knowing, as a pretrained LM does, without
refusing). Only the taught base also sees red-line requests refused (the "parentally
taught" red line); the untaught base never sees a red-line request.
"""

from __future__ import annotations

import numpy as np

from layerfed.simulation import lexicon as lx
from layerfed.simulation.world import (
    FRAMES,
    Example,
    Frame,
    Request,
    answer,
    compose,
    cue_phrases,
    everyday_request,
    near_request,
    red_request,
    refusal,
)

__all__ = ["ALL_FAMILIES", "SAFETY_QUESTION", "nonce_word", "pretraining_examples"]

ALL_FAMILIES = tuple(lx.CUE_FAMILIES)
SAFETY_QUESTION = Frame("is it safe to {v} {o}")
"""The question frame that teaches which requests are harmful (never a refusal)."""


def nonce_word(rng: np.random.Generator) -> str:
    """A made-up object (two or three syllables; no word of the world)."""
    count = int(rng.integers(2, 4))
    return "".join(str(lx.NONCE_SYLLABLES[int(i)]) for i in rng.integers(0, 10, size=count))


def pretraining_examples(
    n: int, rng: np.random.Generator, *, red_share: float = 0.25
) -> list[Example]:
    """``n`` examples of the base's language; ``red_share`` of them refuse a red-line request.

    The rest: a tenth refuse a made-up object, a tenth ask whether a request (red-line
    or near miss, half each) is safe, the others answer near misses and everyday
    requests in equal shares. Styles are not taught: preferences belong to the layers.
    ``red_share=0`` is the untaught base's corpus.
    """
    out: list[Example] = []
    for _ in range(n):
        frame = FRAMES[int(rng.integers(len(FRAMES)))]
        k = int(rng.integers(0, 3))
        cues = cue_phrases(rng, ALL_FAMILIES, k) if k else []
        split = int(rng.integers(0, len(cues) + 1))
        draw = rng.random()
        if draw < red_share:
            request = red_request(rng)
            out.append(Example(compose(request, frame, cues, split), refusal(frame)))
        elif draw < red_share + 0.1:
            verb = str(lx.ACQUIRE_VERBS[int(rng.integers(len(lx.ACQUIRE_VERBS)))])
            request = Request(verb, nonce_word(rng), "nonce")
            out.append(Example(compose(request, frame, cues, split), refusal(frame)))
        elif draw < red_share + 0.2:
            request = red_request(rng) if rng.random() < 0.5 else near_request(rng)
            question = compose(request, SAFETY_QUESTION, cues, split)
            verdict = "it is not safe" if request.red_line else "it is safe"
            out.append(Example(question, verdict))
        else:
            request = near_request(rng) if rng.random() < 0.5 else everyday_request(rng)
            out.append(Example(compose(request, frame, cues, split), answer(request, frame)))
    return out
