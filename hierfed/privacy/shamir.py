"""Shamir t-of-n secret sharing (Shamir 1979) of 32-byte secrets over the prime field GF(2^521 − 1):
any t shares give the secret back, fewer give nothing about it. Secure aggregation shares each
client's mask seeds this way so an edge can remove the masks of clients that drop out."""

from __future__ import annotations

import secrets

P = 2**521 - 1  # a Mersenne prime, larger than any 256-bit secret
_SIZE = 66  # bytes of a field element


def split(secret: bytes, xs: list[int], t: int) -> dict[int, bytes]:
    """Shares of `secret` for the points `xs` (distinct, non-zero), any `t` of which reconstruct it."""
    if not 1 <= t <= len(xs):
        raise ValueError(f"threshold {t} must be between 1 and the {len(xs)} shareholders")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(P) for _ in range(t - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % P
        out[x] = y.to_bytes(_SIZE, "big")
    return out


def combine(shares: dict[int, bytes], size: int = 32) -> bytes:
    """The secret from shares {x: y} (Lagrange interpolation at 0). With fewer than t shares, or a
    wrong one, the result is some other value: callers check it against a commitment."""
    pts = [(x, int.from_bytes(y, "big")) for x, y in shares.items()]
    secret = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (-xj) % P
                den = den * (xi - xj) % P
        secret = (secret + yi * num * pow(den, -1, P)) % P
    if secret >= 1 << (8 * size):
        return b"\xff" * (size + 1)  # cannot be the secret: fails every commitment check
    return secret.to_bytes(size, "big")
