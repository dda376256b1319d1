"""Privacy: client-level DP-FedAvg (clipping on the device, Gaussian noise on a tier's sum, an
accountant from dp-accounting) and secure aggregation at the edges. Wrappers around a Strategy or a
link, never flags inside them (docs/privacy.md)."""

from __future__ import annotations

from hierfed.privacy.accountant import Accountant, budget
from hierfed.privacy.clip import clip_to_norm
from hierfed.privacy.noise import NoisySum
from hierfed.privacy.setup import (
           check_privacy,
           noise_tier,
           wrap_child,
           wrap_parent,
           wrap_strategy,
           wrap_up,
)
from hierfed.privacy.transport import PrivateChild

__all__ = ["Accountant", "NoisySum", "PrivateChild", "budget", "check_privacy", "clip_to_norm", "noise_tier", "wrap_child", "wrap_parent",
           "wrap_strategy", "wrap_up"]
