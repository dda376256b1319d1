"""Client-level clipping (McMahan et al. 2018, DP-FedAvg): every client's update is scaled to an L2
norm of at most C on its device, so one client moves the tier's SUM by at most C — the sensitivity
that the Gaussian noise (hierfed.privacy.noise) is calibrated to.
"""

from __future__ import annotations

import math

import numpy as np


def clip_to_norm(delta: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """(delta scaled to L2 norm <= clip, its norm before clipping). A new array when scaled; delta
    itself when it already fits (C = inf never scales, so the numbers are untouched)."""
    norm = float(np.linalg.norm(delta.astype(np.float64, copy=False)))
    if norm <= clip or math.isinf(clip):
        return delta, norm
    # scale in float64, store in delta's dtype; rounding to float32 may land a hair above C, so
    # shrink by a few ulps until it does not (the sensitivity bound must hold exactly)
    factor = clip / norm
    while True:
        scaled = (delta.astype(np.float64) * factor).astype(delta.dtype)
        if float(np.linalg.norm(scaled.astype(np.float64))) <= clip:
            return scaled, norm
        factor *= 1 - 2.0**-22
