"""A test and research hook: Byzantine clients, for checking robust aggregation in real runs.

`HIERFED_INJECT_ATTACK` (environment, read by every device rank) names clients whose update is
corrupted before it is queued on the uplink (before clipping, coding or masking, as a malicious
client would send it):

    scale:<factor>:<clients>    the update times <factor>, e.g. scale:100:3
    signflip:<clients>          the update negated (scale:-1)

<clients> is a comma-separated list of client ids. Not a run-config option: it exists so the tests
(tests/mpi/test_robust_jobs.py) and experiments can show what a robust rule buys over FedAvg.
Like HIERFED_INJECT_FAILURE, it is ignored unless set.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from hierfed.errors import HierfedError

ENV = "HIERFED_INJECT_ATTACK"


def parse_attack(spec: str | None) -> tuple[float, set[int]] | None:
    """(factor, attacking clients) from a spec; None when unset or empty."""
    if not spec:
        return None
    parts = spec.split(":")
    try:
        if parts[0] == "scale" and len(parts) == 3:
            factor, clients = float(parts[1]), parts[2]
        elif parts[0] == "signflip" and len(parts) == 2:
            factor, clients = -1.0, parts[1]
        else:
            raise ValueError
        ids = {int(c) for c in clients.split(",")}
    except ValueError:
        raise HierfedError(f"{ENV}={spec!r}: expected scale:<factor>:<client,...> or signflip:<client,...>") from None
    return factor, ids


def attack_hook(spec: str | None = None) -> Callable[[int, np.ndarray], np.ndarray]:
    """(client, delta) -> the delta it sends: corrupted for the clients `spec` (default: the
    environment's) names, unchanged (the same array) for every other client."""
    parsed = parse_attack(os.environ.get(ENV) if spec is None else spec)
    if parsed is None:
        return lambda client, delta: delta
    factor, ids = parsed
    return lambda client, delta: delta * np.asarray(factor, dtype=delta.dtype) if client in ids else delta
