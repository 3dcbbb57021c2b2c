"""A model's parameter names, shapes and ties, and which scopes and red lines match each.

For policy writers scoping their own model (``layerfed model params``) and for
``policy check --model``. A local folder is built from its ``config.json`` on
the meta device: every parameter, buffer and tie the architecture defines,
without reading or allocating weights (tied names such as GPT-2's ``lm_head.weight``
are absent from a checkpoint's safetensors header but present here). A built-in
is loaded through its registered loader (:mod:`~layerfed.layers.builtins`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from layerfed.governance.model_params import ModelParams, alias_hit, in_scope_aliased
from layerfed.governance.patterns import matches
from layerfed.governance.schema import Policy
from layerfed.layers.builtins import builtin_loader
from layerfed.layers.errors import BaseModelError

if TYPE_CHECKING:  # torch, transformers and PEFT load when a model is read, not on import
    import torch

__all__ = ["ParamRow", "param_rows", "params_of", "read_model", "read_model_params"]

log = logging.getLogger("layerfed")
BUILTIN = "builtin:"


def read_model(model: str) -> torch.nn.Module:
    """The model ``model`` names: ``'builtin:NAME'`` (``'tiny'`` too) or a local HF folder.

    A folder gives an uninitialised model on the meta device (names, shapes, ties only).
    :class:`BaseModelError` names what was expected and what was found.
    """
    if model.startswith(BUILTIN) or model == "tiny":
        loaded, _ = builtin_loader(model.removeprefix(BUILTIN))(0)
        module: torch.nn.Module = loaded
        return module
    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        raise BaseModelError(
            f"model: expected 'builtin:NAME' or a Hugging Face folder with config.json, "
            f"got {model!r}"
        )
    log.info("reading the architecture of %s (meta device, no weights)", folder)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            built: torch.nn.Module = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    except (OSError, ValueError, KeyError) as e:
        raise BaseModelError(f"model {model!r}: expected a causal LM config, got: {e}") from e
    return built


def params_of(model: torch.nn.Module, name: str) -> ModelParams:
    """The :class:`ModelParams` of a loaded (or meta) model, labelled ``name``."""
    from layerfed.layers.aliases import tied_parameters
    from layerfed.layers.base import base_parameters, linear_modules

    tensors = base_parameters(model)
    ties = sorted(set(tied_parameters(model).values()))
    return ModelParams(
        model=name,
        shapes={n: tuple(t.shape) for n, t in tensors.items()},
        ties=tuple(ties),
        lora=frozenset(f"{m}.weight" for m in linear_modules(model)),
    )


def read_model_params(model: str) -> ModelParams:
    """:func:`read_model` then :func:`params_of`: the reader ``policy check --model`` uses."""
    return params_of(read_model(model), model)


@dataclass(frozen=True)
class ParamRow:
    """One parameter as a policy writer sees it."""

    name: str
    shape: tuple[int, ...]
    lora: bool
    """A Linear/Conv1D weight: a scope including it gives the layer a LoRA adapter on it."""
    tied: tuple[str, ...]
    """The other names sharing its storage."""
    scopes: tuple[str, ...]
    """Layers whose scope includes it (excludes resolved over ties)."""
    red_lines: tuple[str, ...]
    """Red-line patterns matching it or a name tied to it."""

    @property
    def conflict(self) -> bool:
        """A LoRA weight both in a scope and under a red line: the policy is refused."""
        return self.lora and bool(self.scopes) and bool(self.red_lines)


def param_rows(
    params: ModelParams, *, policy: Policy | None = None, match: str | None = None
) -> list[ParamRow]:
    """Rows for the parameters matching glob ``match`` (all without), sorted by name."""
    aliases = params.aliases()
    rows: list[ParamRow] = []
    for name in params.names:
        if match is not None and not matches(name, match):
            continue
        scopes: list[str] = []
        red: list[str] = []
        if policy is not None:
            scopes = [
                layer.name
                for layer in policy.layers_by_rank()
                if in_scope_aliased(name, layer.scope.include, layer.scope.exclude, aliases)
            ]
            red = [p for p in policy.red_lines.parameters if alias_hit(name, [p], aliases)]
        tied = tuple(a for a in aliases.get(name, ()) if a != name)
        rows.append(
            ParamRow(
                name, params.shapes[name], name in params.lora, tied, tuple(scopes), tuple(red)
            )
        )
    return rows
