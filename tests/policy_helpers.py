"""Shared helpers for policy tests: the default policy as data and writers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "policies"


def default_data() -> dict[str, Any]:
    """A fresh copy of examples/policies/default.yaml as plain data."""
    data = yaml.safe_load((EXAMPLES / "default.yaml").read_text(encoding="utf-8"))
    data["expires"] = "2030-01-01T00:00:00Z"
    return copy.deepcopy(data)


def write_yaml(tmp: Path, data: dict[str, Any], name: str = "policy.yaml") -> Path:
    """Write ``data`` as YAML and return the path."""
    path = tmp / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
