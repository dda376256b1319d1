"""Fixed-point updates in the ring Z_2^32, int8/int4 codes in Z_2^16 or Z_2^32, and the masks that live there.

A client's contribution [w·Δ, w] becomes uint32 words: w·Δ_i ↦ round(w·Δ_i · S) mod 2^32 (values
beyond ±B saturate at ±B·S), the weight w ↦ round(w) (sample counts and DP's 1 are integers). Sums
wrap modulo 2^32 — numpy's uint32 addition and MPI_SUM on MPI_UINT32_T both do (MPICH checked, docs/privacy.md;
relied on by tests/mpi/test_privacy.py) — and are read back as signed int32. The scale S is set by
the largest number n of clients one edge can sum, less n/2 for rounding: S = (2^31 − 1 − n) / (n·B), so
|Σ round(w Δ_i S)| ≤ n·(B·S + 1/2) < 2^31: no overflow at any fan-out, with a resolution of 1/S ≈ n·B / 2^31.

The int8/int4 codes on a shared grid (SharedGrid) use the narrowest ring their edge's sum fits:
n codes in [−L, L] sum to [−nL, nL], which Z_2^16 read as int16 holds when nL <= 2^15 − 1 (int8:
n <= 258 clients, int4: n <= 4681), else Z_2^32 (`ring_bits`). The weight word would not fit 16 bits
(sample counts sum past 65535), so in Z_2^16 it travels as limbs of b bits each in its own word,
b the largest with n(2^b − 1) <= 2^16 − 1: a limb sum never wraps, and Σw = Σ_j 2^(bj)·(limb sum j).

Masks are keystreams of ChaCha20 (RFC 8439, from `cryptography`) keyed by a 32-byte seed, read as
little-endian words of the ring's width.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_LIMIT = 2**31 - 1
_RINGS: dict[int, np.dtype[Any]] = {16: np.dtype(np.uint16), 32: np.dtype(np.uint32)}


def ring_bits(levels: int, fan_out: int) -> int:
    """The ring width (16 or 32 bits) for sums of `fan_out` codes in [−levels, levels]: 16 when
    every such sum lies in int16's range (fan_out·levels <= 2^15 − 1, i.e. the sum's 2·n·L + 1
    values fit 2^16), else 32. Fixed by the topology before launch: no message agrees it."""
    return 16 if fan_out * levels <= 2**15 - 1 else 32


def limb_bits(fan_out: int) -> int:
    """Bits per limb of the weight word in Z_2^16: the largest b <= 16 with fan_out·(2^b − 1) <= 2^16 − 1."""
    return min(16, (65535 // fan_out + 1).bit_length() - 1)


def _put_weight(out: np.ndarray, dim: int, weight: float, limb: int) -> None:
    w = int(round(weight)) % 2**32
    for j in range(out.size - dim):
        out[dim + j] = (w >> (limb * j)) & ((1 << limb) - 1)


def _get_weight(total: np.ndarray, dim: int, limb: int) -> float:
    w = sum(int(x) << (limb * j) for j, x in enumerate(total[dim:])) % 2**32
    return float(w - 2**32 if w >= 2**31 else w)  # read as int32, as one word of Z_2^32 is


class FixedPoint:
    """The encoding of contributions for at most `fan_out` clients with |w·Δ_i| <= `bound`."""

    def __init__(self, bound: float, fan_out: int) -> None:
        if bound <= 0 or fan_out < 1:
            raise ValueError("fixed point needs bound > 0 and fan_out >= 1")
        self.bound, self.fan_out = float(bound), int(fan_out)
        self.scale = (_LIMIT - self.fan_out) / (self.fan_out * self.bound)  # rounding adds <= 1/2 per client
        self.ring, self.dtype = 32, _RINGS[32]  # 16 bits would leave a resolution of n·B/2^15: too coarse for "lossless"

    def words(self, dim: int) -> int:
        """Ring words of one encoded contribution of `dim` values: [w·Δ, w]."""
        return dim + 1

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


def prg(seed: bytes, words: int, nonce: bytes = b"\0" * 16, dtype: np.dtype | type = np.uint32) -> np.ndarray:
    """`words` ring words (uint32, or uint16 for Z_2^16) of ChaCha20 keystream under the 32-byte `seed`."""
    dt = np.dtype(dtype)
    if dt not in _RINGS.values():
        raise ValueError(f"masks live in Z_2^16 or Z_2^32 (uint16 or uint32), not {dt}")
    enc = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(dt.itemsize * words)), dtype=dt.newbyteorder("<")).astype(dt, copy=False)


class SharedGrid:
    """The int8 (or int4) codec's integer codes under secure aggregation: unbiased stochastic rounding
    (as hierfed.comm.codecs.values.StochasticQuantizer) onto ONE grid that every client of the run
    shares, instead of each block's own (min, step): x ↦ q ∈ [−L, L], L = 2^(bits−1) − 1 (127 for
    int8), step = B/L, q = floor(x/step + u), u ~ U[0, 1), so E[q·step] = x for |x| <= B. Codes are
    signed (zero is code 0), so a sum of codes decodes as step·Σq with no count of senders; the
    weight word is an integer as in FixedPoint. Per-client scales would make the sum of codes
    meaningless, and agreeing a data-dependent scale would reveal each client's range: the scale is
    public, fixed before launch from privacy.secagg_bound.

    The ring: Z_2^16 when the `fan_out` clients of one edge cannot take Σq out of int16 (`ring_bits`),
    with the weight in limbs (`limb_bits`); Z_2^32 otherwise or when `fan_out` is None (|Σq| <= L·n <
    2^31 for any n < 2^23), with the weight in one word.
    """

    def __init__(self, bound: float, bits: int = 8, fan_out: int | None = None) -> None:
        if bound <= 0 or bits not in (4, 8) or (fan_out is not None and fan_out < 1):
            raise ValueError("a shared grid needs bound > 0, 4 or 8 bits and fan_out >= 1")
        self.bound, self.bits = float(bound), bits
        self.levels = 2 ** (bits - 1) - 1
        self.step = self.bound / self.levels
        self.scale = 1.0 / self.step  # one code is this many units of w·Δ (for callers that report resolution)
        self.ring = 32 if fan_out is None else ring_bits(self.levels, fan_out)
        self.dtype = _RINGS[self.ring]
        self.limb = 32 if self.ring == 32 else limb_bits(fan_out or 1)
        self.weight_words = -(-32 // self.limb)

    def words(self, dim: int) -> int:
        """Ring words of one encoded contribution of `dim` values: the codes, then the weight's limbs."""
        return dim + self.weight_words

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
        """([codes, w's limbs] as ring words (self.dtype), saturated coordinates, the codes' values)."""
        q, saturated = self.codes(weighted, rng)
        out = np.empty(self.words(q.size), dtype=self.dtype)
        out[: q.size] = q.astype(self.dtype)  # two's complement: mod 2^16 or 2^32
        _put_weight(out, q.size, weight, self.limb)
        return out, saturated, self.values(q)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """A sum of encodings (self.dtype) -> [step·Σq, Σ w] in float64."""
        dim = total.size - self.weight_words
        out = np.empty(dim + 1, dtype=np.float64)
        out[:-1] = total[:dim].view(np.int16 if self.ring == 16 else np.int32) * self.step
        out[-1] = _get_weight(total, dim, self.limb)
        return out
