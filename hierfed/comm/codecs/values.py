"""Value codecs: how n float32 values become bytes (identity, fp16, bf16, stochastic int8/int4).

Each writes exactly `body_size(n)` bytes into a uint8 view and reads them back. They are used on
the whole vector, or on the kept values of a sparsifier.
"""

from __future__ import annotations

import numpy as np

from hierfed.comm.codecs.wire import CodecError


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


class ValueCodec:
    name = ""
    stochastic = False  # needs a numpy Generator
    unbiased = False  # E[decode(encode(x))] = x exactly (not just approximately)

    @property
    def spec(self) -> str:
        return self.name

    def body_size(self, n: int) -> int:
        raise NotImplementedError

    def encode_into(self, x: np.ndarray, out: np.ndarray, rng: np.random.Generator | None) -> None:
        raise NotImplementedError

    def decode(self, body: np.ndarray, n: int) -> np.ndarray:
        raise NotImplementedError


class Identity(ValueCodec):
    """Raw little-endian float32: lossless."""

    name = "identity"
    unbiased = True

    def body_size(self, n: int) -> int:
        return 4 * n

    def encode_into(self, x, out, rng) -> None:
        out.view("<f4")[:] = x

    def decode(self, body, n) -> np.ndarray:
        return body.view("<f4").astype(np.float32)


class Float16(ValueCodec):
    """IEEE half, round to nearest even: relative error <= 2^-11 (normal range), |x| <= 65504."""

    name = "fp16"

    def body_size(self, n: int) -> int:
        return 2 * n

    def encode_into(self, x, out, rng) -> None:
        with np.errstate(over="ignore"):
            h = x.astype("<f2")
        over = np.isinf(h)
        if over.any():
            i = _first_bad(over)
            raise CodecError(f"fp16 cannot encode {x[i]!r} at index {i}: outside ±65504 (use bf16)")
        out.view("<f2")[:] = h

    def decode(self, body, n) -> np.ndarray:
        return body.view("<f2").astype(np.float32)


class BFloat16(ValueCodec):
    """The top 16 bits of float32, round to nearest even: relative error <= 2^-8, float32's range."""

    name = "bf16"

    def body_size(self, n: int) -> int:
        return 2 * n

    def encode_into(self, x, out, rng) -> None:
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        # Round to nearest even on the 16 dropped bits: add 0x7FFF plus the kept LSB, then shift.
        # Finite inputs stay below 0xFF800000, so the uint32 sum cannot wrap.
        h = ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype("<u2")
        over = (h & 0x7F80) == 0x7F80
        if over.any():
            i = _first_bad(over)
            raise CodecError(f"bf16 cannot encode {x[i]!r} at index {i}: rounds past the largest bf16")
        out.view("<u2")[:] = h

    def decode(self, body, n) -> np.ndarray:
        return (body.view("<u2").astype(np.uint32) << 16).view(np.float32)


class StochasticQuantizer(ValueCodec):
    """Unbiased uniform quantisation to `bits` bits with one (min, step) pair per block of values.

    Per block: lo = min, step = (max - min) / (2^bits - 1), both float32, step rounded up so that
    lo + (2^bits - 1) * step >= max. A value x with t = (x - lo) / step is sent as floor(t) + 1 with
    probability t - floor(t), else floor(t): E[lo + q * step] = x, |decode - x| < step.
    Body: lo (f32 x nblocks), step (f32 x nblocks), codes (int8: 1 byte each; int4: two per byte,
    the even index in the low nibble).
    """

    stochastic = True
    unbiased = True

    def __init__(self, bits: int, block: int) -> None:
        assert bits in (4, 8) and block >= 1
        self.bits = bits
        self.block = block
        self.levels = (1 << bits) - 1
        self.name = f"int{bits}"

    @property
    def spec(self) -> str:
        return f"int{self.bits}:block={self.block}"

    def nblocks(self, n: int) -> int:
        return -(-n // self.block)

    def code_size(self, n: int) -> int:
        return n if self.bits == 8 else (n + 1) // 2

    def body_size(self, n: int) -> int:
        return 8 * self.nblocks(n) + self.code_size(n)

    def _per_value(self, per_block: np.ndarray, n: int) -> np.ndarray:
        return np.repeat(per_block, self.block)[:n]

    def encode_into(self, x, out, rng) -> None:
        n, nb = x.size, self.nblocks(x.size)
        if n == 0:
            return
        starts = np.arange(0, n, self.block)
        lo = np.minimum.reduceat(x, starts).astype(np.float64)
        span = np.maximum.reduceat(x, starts).astype(np.float64) - lo
        step = (span / self.levels).astype(np.float32)
        short = step.astype(np.float64) * self.levels < span  # float32 rounding lost the top of the block
        step[short] = np.nextafter(step[short], np.float32(np.inf))
        if not np.isfinite(step).all():
            raise CodecError(f"{self.spec} cannot encode: a block's range overflows float32")
        step64 = step.astype(np.float64)
        t = (x - self._per_value(lo, n)) / self._per_value(np.where(step64 > 0, step64, 1.0), n)
        q = np.clip(np.floor(t + rng.random(n)), 0, self.levels).astype(np.uint8)
        out[: 4 * nb].view("<f4")[:] = lo
        out[4 * nb : 8 * nb].view("<f4")[:] = step
        codes = out[8 * nb :]
        if self.bits == 8:
            codes[:] = q
        else:
            if n % 2:
                q = np.append(q, np.uint8(0))
            codes[:] = q[0::2] | (q[1::2] << 4)

    def decode(self, body, n) -> np.ndarray:
        nb = self.nblocks(n)
        lo = body[: 4 * nb].view("<f4").astype(np.float64)
        step = body[4 * nb : 8 * nb].view("<f4").astype(np.float64)
        if not (np.isfinite(lo).all() and np.isfinite(step).all() and (step >= 0).all()):
            raise CodecError(f"corrupt {self.spec} payload: a block scale is negative or not finite")
        codes = body[8 * nb :]
        if self.bits == 8:
            q = codes
        else:
            q = np.empty(2 * codes.size, dtype=np.uint8)
            q[0::2] = codes & 0x0F
            q[1::2] = codes >> 4
            if n % 2 and q[-1] != 0:
                raise CodecError(f"corrupt {self.spec} payload: padding nibble is not zero")
            q = q[:n]
        return (self._per_value(lo, n) + q * self._per_value(step, n)).astype(np.float32)
