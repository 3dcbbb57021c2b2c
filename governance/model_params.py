"""Parameter names of a base model, for matching scope and red-line patterns."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["parameter_names"]


def parameter_names(model: str) -> list[str]:
    """Names of the parameters of ``model``: 'tiny' / 'builtin:tiny' or a local HF folder.

    A local folder is read from its safetensors headers only (no weights are loaded).
    Raises ValueError or OSError naming what was expected and what was found.
    """
    if model in ("tiny", "builtin:tiny"):
        from layerfed.layers.tiny import build_tiny_model

        return sorted(build_tiny_model().state_dict())
    folder = Path(model)
    if not folder.is_dir():
        raise ValueError(f"'tiny' or an existing model folder, got '{model}'")
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return sorted(str(name) for name in weight_map)
    if not files:
        raise ValueError(f"a folder with *.safetensors weights, got none in '{model}'")
    names: list[str] = []
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            names.extend(str(k) for k in handle.keys())  # noqa: SIM118
    return sorted(names)
