"""What secure aggregation hands a round for one slot: the unmasked mean and who is in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SecureSum"]


@dataclass
class SecureSum:
    """One secure slot's outcome: the weighted mean (None: skipped, ``reason`` says why).

    ``digests`` maps each contributor's instance id to the digest of its signed,
    masked update (what the server verified and acknowledges). The server never
    holds any one contributor's unmasked update.
    """

    mean: dict[str, np.ndarray[Any, Any]] | None
    digests: dict[str, str]
    weight: float
    cohort: int
    survivors: int
    reason: str = ""
    unreachable: list[int] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
