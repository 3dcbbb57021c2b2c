"""Where the base model runs and in which dtype: deployment settings, never policy.

A deployment names a ``device`` (``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` / ``mps``;
``auto`` picks CUDA, then MPS, else the CPU) and the base's ``dtype`` (``float32`` /
``bfloat16`` / ``float16``). Only the frozen base takes the dtype: slots (LoRA A and B,
memories) stay float32 on every side and aggregation stays float32/float64, so a
bfloat16 instance and a float32 server agree on what was committed.

Names are checked here without importing torch (:func:`check_device`,
:func:`check_dtype`), so a config with a typo fails fast; :func:`resolve_device`
and :func:`resolve_dtype` turn them into torch objects when a model is loaded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from layerfed.layers.errors import BaseModelError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_DEVICE",
    "DEFAULT_DTYPE",
    "DEVICES",
    "DTYPES",
    "DeviceSettingError",
    "check_device",
    "check_dtype",
    "device_is_cuda",
    "float32_compute",
    "model_device",
    "model_dtype",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger("layerfed")

DEFAULT_DEVICE = "cpu"
DEFAULT_DTYPE = "float32"
DEVICES = "auto, cpu, cuda, cuda:N, mps"
"""The device names a setting accepts (for messages and ``--help``)."""
DTYPES = ("float32", "bfloat16", "float16")
"""The base dtypes a setting accepts."""
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")


class DeviceSettingError(BaseModelError):
    """A device or dtype setting is malformed or unavailable (names the setting)."""

    def __init__(self, setting: str, expected: str, got: object) -> None:
        self.setting, self.expected, self.got = setting, expected, got
        super().__init__(f"{setting}: expected {expected}, got {got!r}")


def check_device(name: str, *, setting: str = "device") -> str:
    """``name`` if it is a device name (:data:`DEVICES`); nothing is probed, torch not imported."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise DeviceSettingError(setting, f"one of {DEVICES}", name)
    return name


def check_dtype(name: str, *, setting: str = "dtype") -> str:
    """``name`` if it is a base dtype (:data:`DTYPES`); torch is not imported."""
    if name not in DTYPES:
        raise DeviceSettingError(setting, f"one of {', '.join(DTYPES)}", name)
    return name


def resolve_device(name: str, *, setting: str = "device") -> torch.device:
    """The torch device ``name`` selects; :class:`DeviceSettingError` if it is not present.

    ``auto`` is CUDA device 0 when CUDA is available, else MPS when available, else the CPU.
    """
    import torch

    check_device(name, setting=setting)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise DeviceSettingError(
                setting, f"an available CUDA device (this machine has {count})", name
            )
        return torch.device("cuda", index)
    if name == "mps" and not _mps_available():
        raise DeviceSettingError(setting, "an available MPS device (none on this machine)", name)
    return torch.device(name)


def device_is_cuda(name: str) -> bool:
    """Whether ``name`` runs on CUDA here (``auto`` with CUDA present, or ``cuda[:N]``)."""
    if name == "cpu" or name == "mps":
        return False
    import torch

    return bool(torch.cuda.is_available()) and (name == "auto" or name.startswith("cuda"))


def resolve_dtype(name: str, *, setting: str = "dtype") -> torch.dtype:
    """The torch dtype ``name`` names."""
    import torch

    check_dtype(name, setting=setting)
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 without any)."""
    import torch

    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextmanager
def float32_compute(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model``'s non-float32 base tensors in float32 inside, restored bit for bit after.

    Widening bfloat16/float16 to float32 is exact and narrowing the same values back is
    too, so the base (and its red-line digest) is unchanged afterwards; LoRA weights are
    float32 already and untouched. A float32 model is left alone (nothing happens).
    The widened copy replaces the narrow one while inside (no second base is kept).
    """
    import torch

    narrowed: list[tuple[torch.Tensor, torch.dtype]] = []
    seen: set[int] = set()
    tensors = [*model.parameters(), *model.buffers()]
    for t in tensors:
        if id(t) in seen or not t.is_floating_point() or t.dtype == torch.float32:
            continue
        seen.add(id(t))
        narrowed.append((t, t.dtype))
        t.data = t.data.float()
    try:
        yield
    finally:
        for t, dtype in narrowed:
            t.data = t.data.to(dtype)


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
