"""Seeds derived from integers: every random choice in a run comes from (seed, round, edge round,
client, ...), so runs are reproducible and a resumed run continues exactly.

One scheme throughout hierfed: numpy's SeedSequence, which mixes a list of integers into
well-spread entropy. Generators take the list directly (`np.random.default_rng([seed, round, ...])`);
torch and other consumers that want one integer take `derive_seed`.
"""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers in [0, 2**64): SeedSequence's first 64-bit word, halved
    (torch.manual_seed wants a value below 2**63). Stable across processes, platforms and numpy
    versions (SeedSequence's algorithm is fixed by NEP 19).

    SeedSequence alone splits a large int into 32-bit words and pads with zeros, so (2**32,) and
    (0, 1), or (1,) and (1, 0), would mix the same words; each part is therefore given two words
    and the count goes last, which makes the words different for different tuples."""
    words: list[int] = []
    for p in parts:
        p = int(p)
        if not 0 <= p < 2**64:
            raise ValueError(f"derive_seed: {p} is not in [0, 2**64)")
        words += [p & 0xFFFFFFFF, p >> 32]
    word = np.random.SeedSequence([*words, len(parts)]).generate_state(1, np.uint64)[0]
    return int(word) >> 1
