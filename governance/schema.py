"""The governance policy schema: frozen pydantic models, unknown fields forbidden.

Field-level constraints live here; cross-field rules (references, ranks, red
lines against scopes, expiry) live in :mod:`layerfed.governance.semantics`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from layerfed.governance.schema_base import (
    DURATION_PATTERN,
    FORMAT_VERSION,
    Duration,
    Name,
    SlotKey,
    parse_duration,
    text_words,
)
from layerfed.governance.schema_base import Frozen as _Frozen
from layerfed.governance.schema_rules import (
    BaseModelRef,
    Condition,
    Limits,
    NormCondition,
    PolicySigners,
    Principal,
    ProbeRegressionCondition,
    ProbeSuite,
    ProjectionBasis,
    ProtectMode,
    QuorumCondition,
    RedLineProbe,
    RedLines,
    ScopeCondition,
    Superego,
    Veto,
)

__all__ = [
    "DEFAULT_LAYERS",
    "DURATION_PATTERN",
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
    "ProjectionBasis",
    "ProtectMode",
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
    roles: list[Name] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description=(
            "Roles whose feedback trains this layer (each role trains one layer). Absent: "
            "'everyone' (a person's own feedback) for a per-instance layer, else the role "
            "named like the layer."
        ),
    )

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
        # Absent privacy and roles are left out, so signatures over older policies still hold.
        data: dict[str, Any] = handler(self)
        for name in ("privacy", "roles"):
            if data.get(name, 0) is None:
                del data[name]
        return data


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
