"""Errors a policy file can cause: one typed family, each naming file, line, column and field."""

from __future__ import annotations

from dataclasses import dataclass

from layerfed.errors import LayerfedError

__all__ = ["Diagnostic", "PolicyError", "PolicyLoadError", "PolicySemanticError"]


@dataclass(frozen=True)
class Diagnostic:
    """One problem found in a policy, located as precisely as the source allows."""

    file: str
    line: int
    column: int
    path: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = self.path or "<document>"
        return f"{self.file}:{self.line}:{self.column}: {self.severity}: {where}: {self.message}"


class PolicyError(LayerfedError):
    """Base of every error raised while reading or checking a policy."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = list(diagnostics)
        super().__init__("\n".join(str(d) for d in self.diagnostics))


class PolicyLoadError(PolicyError):
    """The file could not be read, parsed or validated against the schema."""


class PolicySemanticError(PolicyError):
    """The policy is well-formed but breaks a cross-field rule."""
