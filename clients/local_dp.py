"""Local differential privacy: the instance clips and noises its update before signing.

For a ``local_dp`` layer the delta an instance trained is clipped to the
layer's ``clip_norm`` (L2 over all its arrays) and every coordinate gets
N(0, (z * clip_norm)^2): one Gaussian mechanism with noise multiplier ``z`` per
round, on the instance, so neither the server nor anyone who later reads the
slot ever sees the exact update (docs/privacy.md). The noise seed comes from the
operating system unless the host gives one (the gym, for reproducible runs).
"""

from __future__ import annotations

import zlib

from layerfed.governance.privacy_accounting import noise_multiplier
from layerfed.governance.schema import LayerPolicy
from layerfed.layers.arrays import Arrays, add_gaussian, clip_to_norm, noise_rng
from layerfed.layers.slots import SlotId

__all__ = ["privatise"]


def privatise(
    delta: Arrays, layer: LayerPolicy, slot: SlotId, round_: int, seed: int | None
) -> Arrays:
    """``delta`` clipped and noised when ``layer`` uses local DP; otherwise unchanged."""
    privacy = layer.privacy
    if privacy is None or privacy.mode != "local_dp" or privacy.clip_norm is None or not delta:
        return delta
    clipped = clip_to_norm(delta, privacy.clip_norm).arrays
    rng = noise_rng(seed, [round_, zlib.crc32(str(slot).encode())])
    return add_gaussian(clipped, noise_multiplier(privacy) * privacy.clip_norm, rng)
