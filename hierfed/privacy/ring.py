"""Fixed-point updates in the ring Z_2^32, and the masks that live there.

A client's contribution [w·Δ, w] becomes uint32 words: w·Δ_i ↦ round(w·Δ_i · S) mod 2^32 (values
beyond ±B saturate at ±B·S), the weight w ↦ round(w) (sample counts and DP's 1 are integers). Sums
wrap modulo 2^32 — numpy's uint32 addition and MPI_SUM on MPI_UINT32_T both do (MPICH checked, docs/privacy.md;
relied on by tests/mpi/test_privacy.py) — and are read back as signed int32. The scale S is set by
the largest number n of clients one edge can sum, less n/2 for rounding: S = (2^31 − 1 − n) / (n·B), so
|Σ round(w Δ_i S)| ≤ n·(B·S + 1/2) < 2^31: no overflow at any fan-out, with a resolution of 1/S ≈ n·B / 2^31.

Masks are keystreams of ChaCha20 (RFC 8439, from `cryptography`) keyed by a 32-byte seed.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_LIMIT = 2**31 - 1


class FixedPoint:
    """The encoding of contributions for at most `fan_out` clients with |w·Δ_i| <= `bound`."""

    def __init__(self, bound: float, fan_out: int) -> None:
        if bound <= 0 or fan_out < 1:
            raise ValueError("fixed point needs bound > 0 and fan_out >= 1")
        self.bound, self.fan_out = float(bound), int(fan_out)
        self.scale = (_LIMIT - self.fan_out) / (self.fan_out * self.bound)  # rounding adds <= 1/2 per client

    def encode(self, weighted: np.ndarray, weight: float) -> tuple[np.ndarray, int]:
        """([w·Δ, w] as uint32 words, how many coordinates saturated at ±bound)."""
        x = np.asarray(weighted, dtype=np.float64)
        saturated = int(np.count_nonzero(np.abs(x) > self.bound))
        q = np.rint(np.clip(x, -self.bound, self.bound) * self.scale).astype(np.int64)
        out = np.empty(x.size + 1, dtype=np.uint32)
        out[:-1] = q.astype(np.uint32)  # two's complement: mod 2^32
        out[-1] = np.uint32(int(round(weight)) % 2**32)
        return out, saturated

    def decode(self, total: np.ndarray) -> np.ndarray:
        """A sum of encodings (uint32) -> [Σ w·Δ, Σ w] in float64."""
        signed = total.view(np.int32).astype(np.float64)
        signed[:-1] /= self.scale
        return signed


def prg(seed: bytes, words: int, nonce: bytes = b"\0" * 16) -> np.ndarray:
    """`words` uint32 of ChaCha20 keystream under the 32-byte `seed`."""
    enc = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(4 * words)), dtype="<u4").astype(np.uint32, copy=False)
