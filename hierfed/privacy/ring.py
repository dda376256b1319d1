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


class SharedGrid:
    """The int8 (or int4) codec's integer codes under secure aggregation: unbiased stochastic rounding
    (as hierfed.comm.codecs.values.StochasticQuantizer) onto ONE grid that every client of the run
    shares, instead of each block's own (min, step): x ↦ q ∈ [−L, L], L = 2^(bits−1) − 1 (127 for
    int8), step = B/L, q = floor(x/step + u), u ~ U[0, 1), so E[q·step] = x for |x| <= B. Codes are
    signed (zero is code 0), so a sum of codes decodes as step·Σq with no count of senders; the
    weight word is an integer as in FixedPoint. Per-client scales would make the sum of codes
    meaningless, and agreeing a data-dependent scale would reveal each client's range: the scale is
    public, fixed before launch from privacy.secagg_bound. |Σq| <= L·n < 2^31 for any n < 2^23.
    """

    def __init__(self, bound: float, bits: int = 8) -> None:
        if bound <= 0 or bits not in (4, 8):
            raise ValueError("a shared grid needs bound > 0 and 4 or 8 bits")
        self.bound, self.bits = float(bound), bits
        self.levels = 2 ** (bits - 1) - 1
        self.step = self.bound / self.levels
        self.scale = 1.0 / self.step  # one code is this many units of w·Δ (for callers that report resolution)

    def codes(self, weighted: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """(int64 codes of w·Δ, how many coordinates saturated at ±bound)."""
        x = np.asarray(weighted, dtype=np.float64)
        saturated = int(np.count_nonzero(np.abs(x) > self.bound))
        t = np.clip(x, -self.bound, self.bound) / self.step
        q = np.clip(np.floor(t + rng.random(x.size)), -self.levels, self.levels).astype(np.int64)
        return q, saturated

    def values(self, q: np.ndarray) -> np.ndarray:
        """What codes stand for (float64): a client's quantised w·Δ, for its error-feedback residual."""
        return q.astype(np.float64) * self.step

    def encode(self, weighted: np.ndarray, weight: float, rng: np.random.Generator) -> tuple[np.ndarray, int, np.ndarray]:
        """([codes, w] as uint32 words, saturated coordinates, the codes' values)."""
        q, saturated = self.codes(weighted, rng)
        out = np.empty(q.size + 1, dtype=np.uint32)
        out[:-1] = q.astype(np.uint32)  # two's complement: mod 2^32
        out[-1] = np.uint32(int(round(weight)) % 2**32)
        return out, saturated, self.values(q)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """A sum of encodings (uint32) -> [step·Σq, Σ w] in float64."""
        signed = total.view(np.int32).astype(np.float64)
        signed[:-1] *= self.step
        return signed
