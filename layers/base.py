"""Loading the frozen base model and reading its parameters by their base names.

Scopes and red lines name the BASE model's parameters (``transformer.h.0.attn.c_attn.weight``).
Once PEFT wraps a model, those weights move under ``base_layer``; the helpers here
map them back so every other module can speak in base names only.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from layerfed.governance.schema import BaseModelRef
from layerfed.layers.builtins import builtin_loader
from layerfed.layers.device import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    check_device,
    check_dtype,
    resolve_device,
    resolve_dtype,
)
from layerfed.layers.errors import BaseModelError

__all__ = ["base_parameters", "linear_modules", "load_base", "peft_wrapping", "unwrap"]

log = logging.getLogger("layerfed")


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around ``get_peft_model``: PEFT 0.21's ``PeftModel.__init__`` reads the model's
    ``is_gradient_checkpointing``, which transformers 5 deprecated (a FutureWarning on
    every instance load). Only that warning, raised inside the wrap, is silenced; the
    value PEFT reads (our bases never checkpoint) and every other warning are unchanged.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"`is_gradient_checkpointing` is deprecated",
            category=FutureWarning,
        )
        yield


def load_base(
    ref: BaseModelRef,
    *,
    seed: int = 0,
    root: Path | None = None,
    device: str = DEFAULT_DEVICE,
    dtype: str = DEFAULT_DTYPE,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model (frozen, eval mode) and tokenizer that ``ref`` names.

    ``builtin: NAME`` is a model registered in the ``layerfed.base_models`` entry point
    group (the gym registers ``tiny``: :mod:`layerfed.simulation.tiny_pretrain`), built
    for ``seed``; ``path`` loads a local Hugging Face folder (relative paths resolve
    against ``root``, default the cwd). ``device`` and ``dtype`` place the base
    (:mod:`layerfed.layers.device`; checked before anything loads); the defaults,
    float32 on the CPU, leave the loaded model untouched.
    """
    check_device(device)
    check_dtype(dtype)
    where = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    if ref.builtin is not None:
        model, tokenizer = builtin_loader(ref.builtin)(seed)
    else:
        model, tokenizer = _load_local(_resolve(str(ref.path), root), torch_dtype)
    if any(p.is_floating_point() and p.dtype != torch_dtype for p in model.parameters()):
        torch.nn.Module.to(model, dtype=torch_dtype)
    if where.type != "cpu":
        torch.nn.Module.to(model, device=where)
    model.eval()  # type: ignore[no-untyped-call]
    model.requires_grad_(False)
    if (device, dtype) != (DEFAULT_DEVICE, DEFAULT_DTYPE):
        log.info("base model on %s in %s", where, dtype)
    return model, tokenizer


def _resolve(path: str, root: Path | None) -> Path:
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = (root or Path.cwd()) / candidate
    if not candidate.is_dir():
        raise BaseModelError(
            "base_model.path: expected a folder holding a Hugging Face model, "
            f"got {str(candidate)!r} (no such folder)"
        )
    if not (candidate / "config.json").is_file():
        raise BaseModelError(
            f"base_model.path: expected {str(candidate / 'config.json')!r} in the model folder,"
            " got no such file (not a Hugging Face model)"
        )
    return candidate


def _load_local(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    log.info("loading base model from %s", path)
    try:  # dtype always named: transformers 5 otherwise keeps the checkpoint's (e.g. bf16)
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise BaseModelError(
            f"base_model.path: expected a causal LM and tokenizer in {str(path)!r}, got: {e}"
        ) from e
    return model, tokenizer


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under any PEFT wrapper (LoRA layers stay injected)."""
    if isinstance(model, PeftModel):
        inner: torch.nn.Module = model.get_base_model()
        return inner
    return model


def base_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every base parameter and buffer by its base name, tied ones under each name.

    LoRA weights are left out and ``.base_layer`` is dropped from wrapped names, so
    a PEFT-wrapped model reports the same names as the plain base.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in unwrap(model).state_dict(keep_vars=True).items():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Base modules LoRA can target (``nn.Linear`` and GPT-2 ``Conv1D``), by base name."""
    out: dict[str, torch.nn.Module] = {}
    for name, module in unwrap(model).named_modules():
        if isinstance(module, BaseTunerLayer):
            out[name] = module.get_base_layer()
        elif ".base_layer" in name or "lora_" in name or not name:
            continue
        elif isinstance(module, torch.nn.Linear | Conv1D):
            out[name] = module
    return out
