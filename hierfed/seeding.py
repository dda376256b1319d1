"""Seeds derived from integers: every random choice in a run comes from (seed, round, edge round,
client, ...), so runs are reproducible and a resumed run continues exactly."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1
