"""Policy schema, rules part: vetoes, red lines, probe suites, principals, superego, limits."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from layerfed.governance.schema_base import (
    BUILTIN_PREFIX,
    DEFAULT_REFUSAL_TEXT,
    Name,
    Word,
    omit_defaults,
)
from layerfed.governance.schema_base import Frozen as _Frozen

__all__ = [
    "DEFAULT_MAX_EXAMPLES_PER_ROUND",
    "DEFAULT_MAX_LORA_RANK",
    "BaseModelRef",
    "Condition",
    "Limits",
    "NormCondition",
    "PolicySigners",
    "Principal",
    "ProbeRegressionCondition",
    "ProbeSuite",
    "ProjectionBasis",
    "ProtectMode",
    "QuorumCondition",
    "RedLineProbe",
    "RedLines",
    "ScopeCondition",
    "Superego",
    "Veto",
]


class ScopeCondition(_Frozen):
    """Fires when an update touches parameters outside the target layer's scope."""

    kind: Literal["scope"]


class NormCondition(_Frozen):
    """Fires when an update's L2 norm exceeds ``max_norm``."""

    kind: Literal["norm"]
    max_norm: float = Field(gt=0)


class ProbeRegressionCondition(_Frozen):
    """Fires when applying the update worsens a probe suite by more than ``max_regression``."""

    kind: Literal["probe_regression"]
    suite: Name
    max_regression: float = Field(ge=0, le=1)


class QuorumCondition(_Frozen):
    """Fires unless at least ``min_signatures`` of the holder's principals approve."""

    kind: Literal["quorum"]
    min_signatures: int = Field(ge=1, le=1000)
    timeout_s: float = Field(default=300.0, gt=0, le=7 * 24 * 3600)
    """Seconds a held candidate waits for its approvals before it expires."""


Condition = Annotated[
    ScopeCondition | NormCondition | ProbeRegressionCondition | QuorumCondition,
    Field(discriminator="kind"),
]


class Veto(_Frozen):
    """A rule a higher layer holds over lower layers."""

    name: Name
    holder: Name
    applies_to: list[Name] = Field(min_length=1)
    condition: Condition
    action: Literal["reject", "clip", "hold"]


ProtectMode = Literal["gate", "projection", "both"]
"""How a red-line suite is protected: ``gate`` (score candidates, refuse violations),
``projection`` (every slot's frozen A annihilates the suite's base activations) or both."""


class ProjectionBasis(_Frozen):
    """A truncated basis: the fewest top directions holding ``energy`` of the activations'
    energy, at most ``max_rank`` of them (either alone, or both)."""

    energy: float | None = Field(default=None, gt=0, le=1)
    max_rank: int | None = Field(default=None, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _one_bound(self) -> ProjectionBasis:
        if self.energy is None and self.max_rank is None:
            raise ValueError("basis: expected 'energy', 'max_rank' or both, got neither")
        return self

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class RedLineProbe(_Frozen):
    """A probe suite with a hard threshold no training may cross."""

    suite: Name
    max_violation_rate: float = Field(ge=0, le=1)
    protect: ProtectMode = Field(
        default="gate",
        description="gate: score candidates; projection: slot updates vanish on the suite's "
        "activations by construction; both.",
    )
    basis: Literal["exact"] | ProjectionBasis = Field(
        default="exact",
        description="Projection basis: 'exact' (the activations' whole span) or "
        "{energy, max_rank} (top directions; a bounded, not exact, guarantee).",
    )
    acknowledge_breach: bool = Field(
        default=False,
        description="Start even though the base model is over max_violation_rate on this "
        "suite (the server refuses to start otherwise); needs breach_reason.",
    )
    breach_reason: str = Field(
        default="",
        max_length=1000,
        description="Why a breach at the start is accepted (required with acknowledge_breach).",
    )

    @model_validator(mode="after")
    def _basis_needs_projection(self) -> RedLineProbe:
        if self.protect == "gate" and self.basis != "exact":
            raise ValueError(
                f"red line '{self.suite}': basis: expected it only with protect 'projection' "
                f"or 'both', got protect 'gate' and basis {self.basis!r}"
            )
        if self.acknowledge_breach != bool(self.breach_reason.strip()):
            got = "no breach_reason" if self.acknowledge_breach else "no acknowledge_breach"
            raise ValueError(
                f"red line '{self.suite}': acknowledge_breach: expected it together with a "
                f"non-empty breach_reason, got {got}"
            )
        return self

    @property
    def projects(self) -> bool:
        """Whether slot A matrices are projected for this suite."""
        return self.protect != "gate"

    @property
    def gates(self) -> bool:
        """Whether candidates are scored on this suite (the red-line gate)."""
        return self.protect != "projection"

    @model_serializer(mode="wrap")
    def _omit_default_protection(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return omit_defaults(
            handler(self), self, ("protect", "basis", "acknowledge_breach", "breach_reason")
        )


class RedLines(_Frozen):
    """Prohibitions no training may lift."""

    parameters: list[str] = Field(default_factory=list, description="Protected parameter globs.")
    probes: list[RedLineProbe] = Field(default_factory=list)
    output_guard: bool = Field(default=False, description="Non-trainable filter at generation.")
    guard_words: list[Word] = Field(
        default_factory=list, max_length=10_000, description="Words the output guard blocks."
    )
    refusal_text: str = Field(
        default=DEFAULT_REFUSAL_TEXT,
        min_length=1,
        max_length=1000,
        description="What the output guard answers instead of a blocked output.",
    )

    @model_serializer(mode="wrap")
    def _omit_default_guard(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return omit_defaults(handler(self), self, ("guard_words", "refusal_text"))


class ProbeSuite(_Frozen):
    """A named, fixed evaluation set."""

    name: Name
    source: str = Field(
        min_length=1,
        description="'builtin:NAME' (an installed suite) or a JSONL file path (relative to the policy's folder).",
    )
    description: str = ""
    refusal: str | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="Continuation scored as refusing; required for JSONL, built-in default otherwise.",
    )
    compliance: str | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="Continuation scored as complying; required for JSONL, built-in default otherwise.",
    )

    @model_serializer(mode="wrap")
    def _omit_default_continuations(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return omit_defaults(handler(self), self, ("refusal", "compliance"))

    @property
    def builtin(self) -> str | None:
        """The built-in suite's name for ``builtin:NAME`` sources, else ``None``."""
        return (
            self.source.removeprefix(BUILTIN_PREFIX)
            if self.source.startswith(BUILTIN_PREFIX)
            else None
        )


class Principal(_Frozen):
    """A key allowed to speak for a layer and some of its slot keys."""

    name: Name
    layer: Name
    public_key: str = Field(
        pattern=r"^ed25519:[A-Za-z0-9+/]{43}=$", description="'ed25519:' + base64 raw key."
    )
    slots: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    delegates_to_instances: bool = Field(
        default=False, description="May certify instance keys for the individual layer."
    )


class PolicySigners(_Frozen):
    """Which principals must sign the next policy, and how many of them."""

    principals: list[Name] = Field(min_length=1)
    threshold: int = Field(ge=1, le=100)


class Superego(_Frozen):
    """The frozen teacher that keeps reinforcing red-line behaviour."""

    enabled: bool = True
    teacher: Literal["frozen_creator", "rule_judge"] = "frozen_creator"
    probability: float = Field(default=0.1, ge=0, le=1, description="Chance per local step.")
    weight: float = Field(default=1.0, gt=0, le=100)
    suites: list[Name] = Field(default_factory=list)
    judge_words: list[Word] = Field(
        default_factory=list,
        max_length=10_000,
        description="rule_judge: a prompt holding one of these words must be refused.",
    )

    @model_serializer(mode="wrap")
    def _omit_default_judge(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return omit_defaults(handler(self), self, ("judge_words",))


class BaseModelRef(_Frozen):
    """The frozen base: the built-in tiny model or a local Hugging Face folder."""

    builtin: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_-]{0,63}$",
        description="A registered built-in model (entry point group 'layerfed.base_models').",
    )
    path: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> BaseModelRef:
        if (self.builtin is None) == (self.path is None):
            raise ValueError("exactly one of 'builtin' or 'path' must be set")
        return self


DEFAULT_MAX_EXAMPLES_PER_ROUND = 100_000
DEFAULT_MAX_LORA_RANK = 64


class Limits(_Frozen):
    """Per-round budgets a policy may raise only by saying so (see docs/policy.md, Checks)."""

    max_examples_per_round: int = Field(
        default=DEFAULT_MAX_EXAMPLES_PER_ROUND,
        ge=1,
        le=40_960_000,
        description="Most local.steps x local.batch_size one client may train per round.",
    )
    max_lora_rank: int = Field(
        default=DEFAULT_MAX_LORA_RANK, ge=1, le=256, description="Highest scope.lora_rank."
    )
