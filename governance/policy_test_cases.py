"""Policy test files: cases a policy writer expects a policy to decide, with their lines.

A test file (YAML or TOML, JSON Schema from :func:`case_file_schema`) holds
``cases``; each is a proposed ``update`` (layer, slot, signer, norm, the
parameters it touches, approvals, probe rates) or a ``composition`` (the slots an
instance composes), and what the writer ``expect``\\ s: a decision (``committed``,
``refused``, ``vetoed`` or ``held``) and reason code, or the list of slots.
``layerfed policy test`` decides each case with the federation's own code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from layerfed.errors import LayerfedError
from layerfed.governance.sources import SourceError, read_toml, read_yaml

__all__ = [
    "DECISIONS",
    "Case",
    "CaseFileError",
    "CompositionCase",
    "Expect",
    "LoadedCase",
    "PolicyTestFile",
    "UpdateCase",
    "case_file_schema",
    "load_case_file",
]

Decision = Literal["committed", "refused", "vetoed", "held"]
DECISIONS: tuple[str, ...] = ("committed", "refused", "vetoed", "held")


class CaseFileError(LayerfedError):
    """A test file that cannot be read or does not match the test-file schema."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpdateCase(_Frozen):
    """One proposed slot update, as an instance (or a principal) would send it."""

    layer: str = Field(description="The layer the update is for.")
    slot: str | None = Field(
        default=None,
        description="Slot key ('eu', 'g1', an instance id); default 'global' for a global "
        "layer and the instance id for a per-instance layer.",
    )
    instance: str = Field(default="instance-1", description="The sending instance's id.")
    signer: str = Field(description="The principal whose key signs (or who certified the key).")
    via_instance: bool = Field(
        default=False, description="Signed by the instance's own key, certified by the signer."
    )
    norm: float = Field(default=1.0, ge=0, description="L2 norm of the update.")
    parameters: list[str] = Field(
        min_length=1, description="Base weights it changes, e.g. transformer.h.0.mlp.c_fc.weight."
    )
    memory: str | None = Field(default=None, description="The memory (default the layer's first).")
    approvals: list[str] = Field(
        default_factory=list, description="Principals who approved it (quorum vetoes)."
    )
    probes: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="Suite -> [violation rate before, after] the update (default no change).",
    )


class CompositionCase(_Frozen):
    """An instance whose composed slots are expected."""

    instance: str
    jurisdiction: str | None = None
    groups: list[str] = Field(default_factory=list)


class Expect(_Frozen):
    """What the case should come to."""

    decision: Decision | None = None
    reason: str | None = Field(
        default=None,
        description="Reason code: ok, clipped, a refusal code (red_line, out_of_scope, "
        "norm_exceeded, wrong_slot, forged_layer, unknown_principal, ...) or the veto's name.",
    )
    slots: list[str] | None = Field(default=None, description="Composition: 'layer/key' slots.")


class Case(_Frozen):
    """One test case: a name, what is proposed, what is expected."""

    name: str = Field(min_length=1)
    update: UpdateCase | None = None
    composition: CompositionCase | None = None
    expect: Expect

    @model_validator(mode="after")
    def _one_kind(self) -> Case:
        if (self.update is None) == (self.composition is None):
            raise ValueError("expected exactly one of 'update' or 'composition'")
        if self.update is not None and self.expect.decision is None:
            raise ValueError("expected expect.decision for an update case")
        if self.composition is not None and self.expect.slots is None:
            raise ValueError("expected expect.slots for a composition case")
        return self


class PolicyTestFile(_Frozen):
    """A test file: the cases (``policy`` is a note for readers; the CLI names the policy)."""

    policy: str | None = None
    cases: list[Case] = Field(min_length=1)


class LoadedCase(BaseModel):
    """A case with the file and line it was written at."""

    model_config = ConfigDict(frozen=True)

    file: str
    line: int
    case: Case


def load_case_file(path: Path) -> list[LoadedCase]:
    """The cases of ``path``; :class:`CaseFileError` naming file:line, expected and got."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CaseFileError(f"{path}: expected a readable UTF-8 test file, got {e}") from e
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise CaseFileError(f"{path}: expected a .yaml, .yml or .toml test file, got {suffix!r}")
    try:
        located = read_toml(text) if suffix == ".toml" else read_yaml(text)
    except SourceError as e:
        raise CaseFileError(f"{path}:{e.line}:{e.column}: {e.message}") from e
    try:
        parsed = PolicyTestFile.model_validate(located.data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = tuple(first["loc"])
        field = ".".join(str(p) for p in where) or "<document>"
        if first["type"] == "missing":
            line, col = located.position(where[:-1], key=True)
            what = f"expected field '{where[-1]}', got nothing"
        else:
            line, col = located.position(where)
            what = f"expected {first['msg'].lower()}, got {first.get('input')!r}"
        msg = f"{path}:{line}:{col}: {field}: {what}"
        raise CaseFileError(msg) from e
    return [
        LoadedCase(file=str(path), line=located.position(("cases", i))[0], case=case)
        for i, case in enumerate(parsed.cases)
    ]


def case_file_schema() -> dict[str, Any]:
    """The JSON Schema of a test file."""
    document = PolicyTestFile.model_json_schema()
    document["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    document["title"] = "layerfed policy test file"
    return document
