"""One broken rule of a policy, located at a document path."""

from __future__ import annotations

from dataclasses import dataclass

from layerfed.governance.sources import Path_

__all__ = ["Issue"]


@dataclass(frozen=True)
class Issue:
    """A rule broken at a document path."""

    path: Path_
    message: str
    severity: str = "error"
