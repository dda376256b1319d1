"""Sparsifiers: keep k = ceil(fraction * dim) coordinates and send which ones plus their values.

Index section, whichever is smaller for this (dim, k), so its size depends on dim alone:
  uint32 little-endian indices, ascending      4k bytes
  bitmap, bit i of byte i//8 (LSB first) set   ceil(dim/8) bytes   (when 4k > ceil(dim/8), i.e.
                                                                      denser than about 1/32)
The kept values follow, in ascending index order, through the chain's value codec.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from hierfed.comm.codecs.wire import CodecError

MAX_SPARSE_DIM = 2**32 - 1  # indices are uint32


def format_fraction(f: Fraction) -> str:
    """Exact decimal text of a fraction parsed from decimal text (denominator 2^a 5^b)."""
    whole, frac = divmod(f.numerator, f.denominator)
    digits = ""
    while frac and len(digits) < 30:
        frac *= 10
        d, frac = divmod(frac, f.denominator)
        digits += str(d)
    return f"{whole}.{digits}" if digits else str(whole)


class Sparsifier:
    name = ""
    stochastic = False
    unbiased = False

    def __init__(self, fraction: Fraction) -> None:
        assert 0 < fraction <= 1
        self.fraction = fraction

    @property
    def spec(self) -> str:
        return f"{self.name}:{format_fraction(self.fraction)}"

    def k(self, dim: int) -> int:
        """ceil(fraction * dim), exact (the fraction is rational, no float rounding)."""
        return -((-self.fraction.numerator * dim) // self.fraction.denominator)

    def uses_bitmap(self, dim: int) -> bool:
        return 4 * self.k(dim) > (dim + 7) // 8

    def index_size(self, dim: int) -> int:
        return (dim + 7) // 8 if self.uses_bitmap(dim) else 4 * self.k(dim)

    def select(self, x: np.ndarray, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        """(ascending indices, float32 values to send) for the k kept coordinates."""
        raise NotImplementedError

    def write_indices(self, idx: np.ndarray, dim: int, out: np.ndarray) -> None:
        if self.uses_bitmap(dim):
            mask = np.zeros(dim, dtype=bool)
            mask[idx] = True
            out[:] = np.packbits(mask, bitorder="little")
        else:
            out.view("<u4")[:] = idx

    def read_indices(self, body: np.ndarray, dim: int) -> np.ndarray:
        k = self.k(dim)
        if self.uses_bitmap(dim):
            bits = np.unpackbits(body, bitorder="little")
            if bits[dim:].any():
                raise CodecError(f"corrupt {self.spec} payload: bitmap has bits set past dim {dim}")
            idx = np.flatnonzero(bits[:dim])
            if idx.size != k:
                raise CodecError(f"corrupt {self.spec} payload: bitmap marks {idx.size} coordinates, expected k={k}")
            return idx
        idx = body.view("<u4").astype(np.int64)
        if k and (idx[-1] >= dim or (np.diff(idx) <= 0).any()):
            raise CodecError(f"corrupt {self.spec} payload: indices not strictly ascending below dim {dim}")
        return idx


class TopK(Sparsifier):
    """The k largest |x| (ties: whichever numpy's introselect keeps; deterministic). Biased: use
    with ErrorFeedback so the dropped mass is sent in later rounds."""

    name = "topk"

    def select(self, x, rng):
        dim, k = x.size, self.k(x.size)
        if k == dim:
            idx = np.arange(dim)
        else:
            idx = np.sort(np.argpartition(np.abs(x), dim - k)[dim - k :])
        return idx, x[idx]


class RandK(Sparsifier):
    """k coordinates uniformly at random without replacement. With scaled=True (default) the kept
    values are multiplied by dim/k, so E[decode] = x (unbiased, variance x_i^2 (dim/k - 1)); with
    scaled=False they are sent as they are (biased, but contractive: suits ErrorFeedback)."""

    name = "randk"
    stochastic = True

    def __init__(self, fraction: Fraction, scaled: bool = True) -> None:
        super().__init__(fraction)
        self.scaled = scaled
        self.unbiased = scaled

    @property
    def spec(self) -> str:
        return f"{super().spec},scaled={'true' if self.scaled else 'false'}"

    def select(self, x, rng):
        dim, k = x.size, self.k(x.size)
        idx = np.sort(rng.choice(dim, size=k, replace=False, shuffle=False)) if k else np.zeros(0, np.int64)
        values = x[idx]
        if self.scaled and k:
            values = (values.astype(np.float64) * (dim / k)).astype(np.float32)
            if not np.isfinite(values).all():
                raise CodecError(f"{self.spec} cannot encode: a value times dim/k overflows float32")
        return idx, values
