"""Feedback events: one frozen, validated pydantic model per kind of feedback.

Every event is plain text plus the few indices a kind needs. Checks that need only
the event itself run at construction; checks that need the tokenizer (token
positions) run when a loss tokenizes the event and raise the same error.

Untrusted data enters through :func:`parse_event`, which turns pydantic's
``ValidationError`` into :class:`InvalidFeedback` naming the field, what was
expected and what was got.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from layerfed.errors import LayerfedError

__all__ = [
    "Alternative",
    "Contrast",
    "Demonstration",
    "FeedbackEvent",
    "FieldError",
    "InvalidFeedback",
    "Marks",
    "Preference",
    "Redo",
    "Span",
    "Thumbs",
    "parse_event",
]

Text = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]


class FieldError(LayerfedError):
    """A value in user input is wrong: names where, which field, what was expected and got."""

    def __init__(self, field: str, expected: str, got: object, where: str = "") -> None:
        self.field = field
        self.expected = expected
        self.got = got
        self.where = where
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{field}: expected {expected}, got {got!r}")


class InvalidFeedback(FieldError):  # noqa: N818 (name fixed by the SDK contract)
    """A feedback event (or a row imported as one) is malformed or out of range."""

    @classmethod
    def from_validation(cls, error: ValidationError, where: str = "") -> InvalidFeedback:
        """The first problem of a pydantic ``ValidationError``, as a typed error."""
        first = error.errors(include_url=False)[0]
        ctx = first.get("ctx") or {}
        if first["type"] == "invalid_feedback":
            parts = str(ctx["field"]).split(".")
            loc = tuple(first["loc"]) + tuple(int(p) if p.isdigit() else p for p in parts)
            return cls(_dotted(loc), str(ctx["expected"]), ctx["got"], where)
        if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
            got = first["input"].get("kind") if isinstance(first["input"], Mapping) else None
            return cls("kind", f"one of {', '.join(sorted(_KINDS))}", got, where)
        expected = _EXPECTED.get(first["type"]) or _phrase(first["msg"])
        got = _NOTHING if first["type"] == "missing" else first.get("input")
        return cls(_dotted(first["loc"]), expected, got, where)


class _Nothing:
    """Stands for a missing value in messages: ``got nothing``."""

    def __repr__(self) -> str:
        return "nothing"


_NOTHING = _Nothing()


_EXPECTED = {
    "missing": "a value (the field is required)",
    "extra_forbidden": "no field of this name (unknown fields are forbidden)",
}


def _phrase(message: str) -> str:
    """Pydantic's "Input should be X" as "X", so it reads after "expected"."""
    for lead in ("Input should be ", "Value should be "):
        if message.startswith(lead):
            return message.removeprefix(lead)
    return message[:1].lower() + message[1:]


def _dotted(loc: tuple[int | str, ...]) -> str:
    """``("spans", 1, "end")`` as ``"spans[1].end"``; the model tag of a union is dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part and part not in _KINDS:
            out += f".{part}" if out else part
    return out or "<event>"


def _problem(field: str, expected: str, got: object) -> PydanticCustomError:
    """A cross-field validation failure that keeps the field name through pydantic."""
    return PydanticCustomError(
        "invalid_feedback",
        "{field}: expected {expected}, got {got}",
        {"field": field, "expected": expected, "got": got},
    )


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


class Span(_Event):
    """A half-open character range ``[start, end)`` of a response with a valence of +1 or -1."""

    start: int = Field(ge=0)
    end: int = Field(ge=1)
    valence: Literal[1, -1]

    @model_validator(mode="after")
    def _ordered(self) -> Span:
        if self.end <= self.start:
            raise _problem("end", f"an index greater than start={self.start}", self.end)
        return self


class Thumbs(_Event):
    """Thumbs up or down on a whole response (trained KTO-style)."""

    kind: Literal["thumbs"] = "thumbs"
    prompt: Text
    response: Text
    up: bool


class Preference(_Event):
    """One response preferred over another for the same prompt (trained with DPO)."""

    kind: Literal["preference"] = "preference"
    prompt: Text
    chosen: Text
    rejected: Text

    @model_validator(mode="after")
    def _differ(self) -> Preference:
        if self.chosen == self.rejected:
            raise _problem("rejected", "a response different from chosen", self.rejected)
        return self


class Marks(_Event):
    """Character spans of a response marked good (+1) or bad (-1); credit lands on them only."""

    kind: Literal["marks"] = "marks"
    prompt: Text
    response: Text
    spans: tuple[Span, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _inside_and_disjoint(self) -> Marks:
        previous_end = 0
        ordered = sorted(enumerate(self.spans), key=lambda pair: pair[1].start)
        for i, (index, span) in enumerate(ordered):
            if span.end > len(self.response):
                bound = f"an index <= len(response)={len(self.response)}"
                raise _problem(f"spans.{index}.end", bound, span.end)
            if i and span.start < previous_end:
                bound = f"a start >= {previous_end} (spans must not overlap)"
                raise _problem(f"spans.{index}.start", bound, span.start)
            previous_end = span.end
        return self


class Redo(_Event):
    """A response rewound to its first wrong token and continued correctly (Step-DPO-like).

    ``first_wrong_token`` is a token index into the original response, encoded as it
    follows the prompt (:mod:`layerfed.clients.encoding`); when omitted, the first token
    where original and corrected differ is used.
    """

    kind: Literal["redo"] = "redo"
    prompt: Text
    original: Text
    corrected: Text
    first_wrong_token: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _differ(self) -> Redo:
        if self.original == self.corrected:
            raise _problem("corrected", "a continuation different from original", self.corrected)
        return self


class Alternative(_Event):
    """At one token position the trainer picked one of the model's own top-k candidates.

    ``response_ids`` are the token ids the model generated after the prompt's (recorded
    at generation time); ``position`` indexes them; ``candidates`` are that position's
    top-k ids. When ``response_ids`` is omitted the response is re-tokenized at training
    time as it follows the prompt (:mod:`layerfed.clients.encoding`).
    """

    kind: Literal["alternative"] = "alternative"
    prompt: Text
    response: Text
    position: int = Field(ge=0)
    chosen_token: TokenId
    candidates: tuple[TokenId, ...] = Field(min_length=2)
    response_ids: tuple[TokenId, ...] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _chosen_is_a_candidate(self) -> Alternative:
        if len(set(self.candidates)) != len(self.candidates):
            raise _problem("candidates", "distinct token ids", list(self.candidates))
        if self.chosen_token not in self.candidates:
            expected = f"one of the recorded top-k candidates {list(self.candidates)}"
            raise _problem("chosen_token", expected, self.chosen_token)
        if self.response_ids is not None:
            if self.position >= len(self.response_ids):
                expected = f"a token index < {len(self.response_ids)} (len(response_ids))"
                raise _problem("position", expected, self.position)
            if self.response_ids[self.position] == self.chosen_token:
                expected = "a token other than the sampled one"
                raise _problem("chosen_token", expected, self.chosen_token)
        return self


class Contrast(_Event):
    """A cue that must elicit ``behaviour`` and the nearest cue that must not (same batch)."""

    kind: Literal["contrast"] = "contrast"
    positive_prompt: Text
    negative_prompt: Text
    behaviour: Text

    @model_validator(mode="after")
    def _differ(self) -> Contrast:
        if self.positive_prompt == self.negative_prompt:
            expected = "a cue different from positive_prompt"
            raise _problem("negative_prompt", expected, self.negative_prompt)
        return self


class Demonstration(_Event):
    """The response to give after a prompt, shown by a person (supervised, weighted NLL)."""

    kind: Literal["demonstration"] = "demonstration"
    prompt: Text
    response: Text
    weight: float = Field(default=1.0, gt=0, le=100)


FeedbackEvent = Annotated[
    Thumbs | Preference | Marks | Redo | Alternative | Contrast | Demonstration,
    Field(discriminator="kind"),
]
_KINDS = frozenset(
    {"thumbs", "preference", "marks", "redo", "alternative", "contrast", "demonstration"}
)
_ADAPTER: TypeAdapter[FeedbackEvent] = TypeAdapter(FeedbackEvent)


def parse_event(data: Mapping[str, Any], where: str = "") -> FeedbackEvent:
    """Validate untrusted data as a feedback event; raise :class:`InvalidFeedback` if invalid."""
    if not isinstance(data, Mapping):
        raise InvalidFeedback("<event>", "a mapping with a 'kind' field", data, where)
    try:
        return _ADAPTER.validate_python(dict(data))
    except ValidationError as e:
        raise InvalidFeedback.from_validation(e, where) from e
