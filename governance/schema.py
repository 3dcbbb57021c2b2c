"""The governance policy schema: frozen pydantic models, unknown fields forbidden.

Field-level constraints live here; cross-field rules (references, ranks, red
lines against scopes, expiry) live in :mod:`layerfed.governance.semantics`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

__all__ = [
    "DEFAULT_LAYERS",
    "Aggregator",
    "BaseModelRef",
    "Condition",
    "LayerPolicy",
    "Limits",
    "LocalTraining",
    "Memory",
    "NormCondition",
    "Policy",
    "PolicySigners",
    "Principal",
    "Privacy",
    "ProbeRegressionCondition",
    "ProbeSuite",
    "QuorumCondition",
    "RedLineProbe",
    "RedLines",
    "Scope",
    "ScopeCondition",
    "SecureAggregation",
    "Superego",
    "Veto",
    "parse_duration",
    "text_words",
]

FORMAT_VERSION: Literal[1] = 1
NAME_PATTERN = r"^[a-z][a-z0-9_]*$"
DURATION_PATTERN = r"^[0-9]+(\.[0-9]+)?(s|m|h|d)$"
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

SlotKey = Literal["global", "jurisdiction", "group", "instance"]
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
WORD_PATTERN = r"^[A-Za-z0-9']+$"
Word = Annotated[str, Field(pattern=WORD_PATTERN, max_length=64)]
"""One word of letters, digits or apostrophes (guard and judge words; matched case-insensitively)."""
BUILTIN_PREFIX = "builtin:"
DEFAULT_REFUSAL_TEXT = "Sorry, I cannot help with that."
Duration = Annotated[str, Field(pattern=DURATION_PATTERN, max_length=32)]


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``"90s"``, ``"6h"`` or ``"1.5d"``."""
    match = re.fullmatch(DURATION_PATTERN, text)
    if match is None:
        raise ValueError(f"expected a duration like '6h', got {text!r}")
    return float(text[:-1]) * _DURATION_UNITS[text[-1]]


def _omit_defaults(
    data: dict[str, Any], model: BaseModel, names: tuple[str, ...]
) -> dict[str, Any]:
    """``data`` without the fields ``names`` that hold their defaults.

    Fields added after policies were first signed are left out of dumps at their
    defaults, so canonical bytes (and signatures) of older policies still hold.
    """
    fields = type(model).model_fields
    for name in names:
        if name in data and getattr(model, name) == fields[name].get_default(
            call_default_factory=True
        ):
            del data[name]
    return data


def text_words(text: str) -> list[str]:
    """The lower-cased words of ``text`` as guard and judge words are matched against."""
    return re.findall(r"[a-z0-9']+", text.lower())


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)


class LocalTraining(_Frozen):
    """What an instance does locally each round for a layer."""

    lr: float = Field(default=1e-3, gt=0, le=1, description="Local optimizer learning rate.")
    steps: int = Field(default=4, ge=1, le=10_000, description="Local steps per round.")
    batch_size: int = Field(default=8, ge=1, le=4096, description="Examples per local step.")


class Scope(_Frozen):
    """Which parameters a layer may touch, and the LoRA shape it uses there."""

    include: list[str] = Field(min_length=1, description="Glob patterns over parameter names.")
    exclude: list[str] = Field(default_factory=list, description="Patterns removed from include.")
    lora_rank: int = Field(default=4, ge=1, le=256, description="LoRA rank r.")
    lora_alpha: float = Field(default=8.0, gt=0, le=4096, description="LoRA alpha.")


class Memory(_Frozen):
    """One component of a slot: its own rate multiplier and half-life."""

    name: Name
    lr_multiplier: float = Field(default=1.0, gt=0, le=100)
    half_life: Annotated[float, Field(gt=0, le=1e9)] | Duration | None = Field(
        default=None,
        description="Half-life in rounds (a number) or as a duration ('6h'); null: no decay.",
    )

    @property
    def half_life_rounds(self) -> float | None:
        """Half-life in rounds, when given in rounds."""
        return float(self.half_life) if isinstance(self.half_life, int | float) else None

    @property
    def half_life_seconds(self) -> float | None:
        """Half-life in seconds, when given as a duration."""
        return parse_duration(self.half_life) if isinstance(self.half_life, str) else None


AggregatorKind = Literal["fedavg", "trimmed_mean", "median", "krum"]


class Aggregator(_Frozen):
    """How a slot's surviving replies are combined."""

    kind: AggregatorKind = "fedavg"
    trim_fraction: float | None = Field(
        default=None, ge=0, lt=0.5, description="trimmed_mean: share cut at each end."
    )
    byzantine: int | None = Field(
        default=None, ge=0, le=10_000, description="krum: number of Byzantine clients tolerated."
    )


PrivacyMode = Literal["none", "central_dp", "local_dp", "secure_aggregation"]


class SecureAggregation(_Frozen):
    """SecAgg+ settings: Shamir threshold, per-coordinate clip range, quantisation, dropouts."""

    threshold: float = Field(
        default=0.6, gt=0.5, le=1, description="Share of a slot's cohort needed to unmask (> 1/2)."
    )
    clip_range: float = Field(
        default=1.0, gt=0, le=1e6, description="Coordinates are clipped to +-clip_range."
    )
    quantization_bits: int = Field(
        default=16, ge=4, le=24, description="Bits per quantised coordinate (sum kept mod 2^32)."
    )
    max_dropout_fraction: float = Field(
        default=0.4, ge=0, lt=0.5, description="Most of a cohort that may drop out."
    )


class Privacy(_Frozen):
    """A layer's privacy: differential privacy (central or local) or secure aggregation."""

    mode: PrivacyMode = "none"
    clip_norm: float | None = Field(
        default=None, gt=0, le=1e6, description="L2 norm every update is clipped to (DP modes)."
    )
    noise_multiplier: float | None = Field(
        default=None, ge=0, le=1e4, description="Gaussian noise std / clip_norm."
    )
    target_epsilon: float | None = Field(
        default=None, gt=0, le=1e4, description="Calibrate the noise to reach this epsilon..."
    )
    target_rounds: int | None = Field(
        default=None, ge=1, le=1_000_000, description="...after this many releases per slot."
    )
    delta: float = Field(default=1e-5, gt=0, lt=1, description="The delta of (epsilon, delta)-DP.")
    epsilon_budget: float | None = Field(
        default=None, gt=0, le=1e4, description="A slot stops training before it would exceed this."
    )
    secagg: SecureAggregation | None = None


def _defaults_not_required(schema: dict[str, Any]) -> None:
    required = schema.get("required")
    if isinstance(required, list):
        schema["required"] = [f for f in required if f not in ("rank", "slot_key", "memories")]


class LayerPolicy(_Frozen):
    """One feedback layer: its rates, scope, memories, aggregation and limits.

    ``rank``, ``slot_key`` and ``memories`` default by name for the five standard layers.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=_defaults_not_required)

    name: Name
    rank: int = Field(ge=0, le=1000, description="Authority; higher outranks lower.")
    slot_key: SlotKey
    server_lr: float = Field(gt=0, le=1, description="Server step along the aggregated update.")
    local: LocalTraining = Field(default_factory=LocalTraining)
    scope: Scope
    memories: list[Memory] = Field(min_length=1, max_length=8)
    aggregator: Aggregator = Field(default_factory=Aggregator)
    norm_cap: float | None = Field(default=None, gt=0, description="Max L2 norm of an update.")
    min_clients: int = Field(default=1, ge=1, le=100_000)
    updates_leave_instance: bool = True
    privacy: Privacy | None = Field(default=None, description="Absent: no privacy mechanism.")

    @model_validator(mode="before")
    @classmethod
    def _defaults_by_name(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaults = DEFAULT_LAYERS.get(str(data.get("name")))
        if defaults is None:
            return data
        return {**defaults, **data}

    @model_serializer(mode="wrap")
    def _omit_unset_privacy(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # An absent privacy block is left out, so signatures over older policies still hold.
        data: dict[str, Any] = handler(self)
        if data.get("privacy", 0) is None:
            del data["privacy"]
        return data


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


class RedLineProbe(_Frozen):
    """A probe suite with a hard threshold no training may cross."""

    suite: Name
    max_violation_rate: float = Field(ge=0, le=1)


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
        return _omit_defaults(handler(self), self, ("guard_words", "refusal_text"))


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
        return _omit_defaults(handler(self), self, ("refusal", "compliance"))

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
        return _omit_defaults(handler(self), self, ("judge_words",))


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


class Policy(_Frozen):
    """A governance policy: the whole document a creator signs."""

    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(min_length=1, max_length=128)
    version: int = Field(ge=1, description="Increases with every change.")
    expires: AwareDatetime
    base_model: BaseModelRef = Field(default_factory=lambda: BaseModelRef(builtin="tiny"))
    layers: list[LayerPolicy] = Field(min_length=1, max_length=64)
    red_lines: RedLines = Field(default_factory=RedLines)
    probe_suites: list[ProbeSuite] = Field(default_factory=list)
    vetoes: list[Veto] = Field(default_factory=list)
    principals: list[Principal] = Field(default_factory=list)
    policy_signers: PolicySigners | None = None
    superego: Superego = Field(default_factory=Superego)
    limits: Limits | None = Field(
        default=None, description="Raised per-round budgets; absent: the defaults apply."
    )
    _source_dir: Path | None = PrivateAttr(default=None)

    @property
    def source_dir(self) -> Path | None:
        """Folder of the file this policy was loaded from (relative suite paths resolve there).

        ``None`` for a policy built in code; it is not part of the signed content.
        """
        return self._source_dir

    def with_source_dir(self, folder: Path) -> Policy:
        """A copy of this policy that remembers ``folder`` as :attr:`source_dir`."""
        copy = self.model_copy()
        copy._source_dir = folder
        return copy

    @field_validator("expires")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @model_serializer(mode="wrap")
    def _omit_unset_limits(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # An absent limits block is left out, so signatures over older policies still hold.
        data: dict[str, Any] = handler(self)
        if data.get("limits", 0) is None:
            del data["limits"]
        return data

    def layer(self, name: str) -> LayerPolicy:
        """The layer called ``name``; KeyError when absent."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def layers_by_rank(self) -> list[LayerPolicy]:
        """Layers from highest rank (creator) to lowest."""
        return sorted(self.layers, key=lambda layer: -layer.rank)


_STM_LTM: list[dict[str, Any]] = [
    {"name": "stm", "lr_multiplier": 1.0, "half_life": 3},
    {"name": "ltm", "lr_multiplier": 0.1, "half_life": 300},
]
_ONE_MEMORY: list[dict[str, Any]] = [{"name": "main", "lr_multiplier": 1.0, "half_life": None}]

DEFAULT_LAYERS: dict[str, dict[str, Any]] = {
    "creator": {"rank": 100, "slot_key": "global", "memories": _ONE_MEMORY},
    "government": {"rank": 80, "slot_key": "jurisdiction", "memories": _ONE_MEMORY},
    "community": {"rank": 60, "slot_key": "global", "memories": _ONE_MEMORY},
    "in_group": {"rank": 40, "slot_key": "group", "memories": _ONE_MEMORY},
    "individual": {
        "rank": 20,
        "slot_key": "instance",
        "memories": _STM_LTM,
        "updates_leave_instance": False,
    },
}
"""Defaults filled in for the five standard layer names when a field is omitted."""
