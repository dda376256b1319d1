"""Split a task's train examples across federated clients: iid, Dirichlet label skew, natural
(by Example.client), shelves (by Example.group, a group split over several clients when needed).

Every scheme returns, per client, sorted int64 indices into the example sequence, and every client
gets at least one example. All randomness comes from the `seed` argument. A scheme reads only the
examples' labels, clients or groups (`_column`): a datasets directory's texts stay on disk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hierfed.data.schema import Example
from hierfed.errors import HierfedError

SCHEMES = ("iid", "dirichlet", "natural", "shelves")
_DIRICHLET_TRIES = 20  # resample draws that leave a client empty, then repair deterministically


def partition(examples: Sequence[Example], num_clients: int, scheme: str, *,
              alpha: float = 0.5, seed: int = 0) -> list[np.ndarray]:
    """Indices into `examples` for each of `num_clients` clients under `scheme`."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) \
            or num_clients < 1:
        raise HierfedError(
            f"partition: num_clients must be a positive integer, got {num_clients!r}"
        )
    if scheme not in SCHEMES:
        raise HierfedError(
            f"partition: unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}"
        )
    n = len(examples)
    if n < num_clients:
        raise HierfedError(
            f"partition: {n} examples cannot give each of {num_clients} clients at least one"
        )
    rng = np.random.default_rng(seed)
    parts: Sequence[Sequence[int] | np.ndarray]
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)  # sizes differ by at most one
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise HierfedError(f"partition: dirichlet alpha must be > 0, got {alpha}")
        parts = _dirichlet(_labels(examples), num_clients, float(alpha), rng)
    elif scheme == "natural":
        parts = _natural(examples, num_clients)
    else:
        parts = _shelves(examples, num_clients, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _column(examples: Sequence[Example], name: str) -> list:
    """Example.<name> of every example; from `column` where the sequence has one (hierfed.data.files.Rows)."""
    column = getattr(examples, "column", None)
    return column(name) if column is not None else [getattr(e, name) for e in examples]


def _labels(examples: Sequence[Example]) -> np.ndarray:
    labels = _column(examples, "label")
    missing = sum(x is None for x in labels)
    if missing:
        raise HierfedError(
            f"dirichlet partition needs a label on every example, {missing} of {len(examples)} "
            "have none; use data.partition=iid or natural for causal-LM data"
        )
    return np.asarray(labels)


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float,
               rng: np.random.Generator) -> list[list[int]]:
    """Per class, shares p ~ Dir(alpha * 1) over clients (Hsu et al. 2019): small alpha -> each
    client sees few classes. Draws that leave a client empty are redrawn; after the last try each
    empty client takes one example from the then-largest client."""
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for k in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == k))
            p = np.nan_to_num(rng.dirichlet(np.full(num_clients, alpha)))
            if p.sum() <= 0:  # every gamma underflowed (alpha ~ 1e-3): give the class to one client
                p = np.eye(num_clients)[rng.integers(num_clients)]
            cuts = (np.cumsum(p / p.sum())[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(map(len, parts)) > 0:
            return parts
    for client in range(num_clients):
        if not parts[client]:
            donor = max(range(num_clients), key=lambda c: len(parts[c]))  # has >= 2 since n >= N
            parts[client].append(parts[donor].pop())
    return parts


def _natural(examples: Sequence[Example], num_clients: int) -> list[list[int]]:
    """Group by Example.client; sorted group i goes to client i % num_clients (1:1 when equal)."""
    owners = _column(examples, "client")
    missing = sum(c is None for c in owners)
    if missing:
        raise HierfedError(
            f"natural partition needs a client on every example (data.client_field), {missing} of "
            f"{len(examples)} have none"
        )
    groups = sorted(set(owners))
    if len(groups) < num_clients:
        hint = ("; data.partition=shelves splits a group over several clients"
                if all(g is not None for g in _column(examples, "group")) else "")
        raise HierfedError(
            f"natural partition: the data has {len(groups)} clients but the topology has "
            f"{num_clients}{hint}"
        )
    slot = {g: i % num_clients for i, g in enumerate(groups)}
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for i, c in enumerate(owners):
        parts[slot[c]].append(i)
    return parts


def _shelves(examples: Sequence[Example], num_clients: int,
             rng: np.random.Generator) -> list[list[int]]:
    """Whole groups (Example.group: a category shelf, a language) per client. Sorted group g goes to
    client g % num_clients when there are at least as many groups as clients; otherwise client c
    serves group c % G, and each group's examples are shuffled (seeded) and cut into near-equal
    parts for its clients, so every client still holds one group only."""
    of = _column(examples, "group")
    missing = sum(g is None for g in of)
    if missing:
        raise HierfedError(
            f"shelves partition needs a group on every example ({missing} of {len(examples)} have "
            "none); data.source=fortunes gives them"
        )
    groups = sorted(set(of))
    members: dict[str, list[int]] = {g: [] for g in groups}
    for i, g in enumerate(of):
        members[g].append(i)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    if len(groups) >= num_clients:
        for gi, g in enumerate(groups):
            parts[gi % num_clients].extend(members[g])
        return parts
    for gi, g in enumerate(groups):
        clients = list(range(gi, num_clients, len(groups)))
        if len(members[g]) < len(clients):
            raise HierfedError(
                f"shelves partition: group {g!r} has {len(members[g])} examples for {len(clients)} clients"
            )
        for c, chunk in zip(clients, np.array_split(rng.permutation(members[g]), len(clients))):
            parts[c].extend(chunk.tolist())
    return parts


def label_skew(examples: Sequence[Example], parts: Sequence[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label mix and the global one:
    0 for identical mixes, near 1 when clients hold disjoint classes."""
    labels = _labels(examples)
    k = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=k) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - overall).sum() for p in parts]
    return float(np.mean(tv))
