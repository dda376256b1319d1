"""Robust aggregates over every child's update: pure functions on a stacked (n_children, dim) array.

None of these is a function of the SUM the reducible path carries, so a parent needs each child's
update (the gathered path; the Strategy classes are in hierfed.strategy.gathered). Each function
takes `updates` (n, dim), any float dtype, and `weights` (n,): a child of weight 0 took no part and is
left out; the others are counted as the rule says (below). Results are float64, written into `out`
(a float64 vector of size dim) when given.

- coordinate_median: per coordinate, the median of the children's values; n even: the mean of the
  two middle values (np.median's convention). Unweighted, as the classic rule (Yin et al. 2018,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML): a weight is a
  claim a Byzantine child could inflate, so weights only decide who took part.
- trimmed_mean: per coordinate, drop the k = floor(β·n) smallest and the k largest values and average
  the n - 2k left (Yin et al. 2018), unweighted; β in [0, 1/2), so at least one value is left.
- krum / multikrum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent", NeurIPS): with f Byzantine children among n > 2f + 2, child i's score is the sum
  of squared L2 distances to its n - f - 2 nearest other children; Krum returns the update with the
  lowest score, Multi-Krum the plain mean of the m lowest (m = n - f by default, as the paper's
  experiments). Ties go to the lower child index (a stable sort).
- norm_clipped_mean: clip each update to L2 norm <= clip_norm (u · min(1, clip_norm / ||u||)), then
  the sample-weighted mean, as FedAvg (norm-bounded averaging: Sun et al. 2019, "Can You Really
  Backdoor Federated Learning?"). It bounds what one child can move the mean (by weight_i / total ·
  2 · clip_norm), not where it points: a sign-flipped update of honest size passes unchanged.

Memory (an edge over ~100 children of ~1M values): besides the stacked input and the O(dim) result,
the median and trimmed mean work on blocks of columns (a float64 copy of at most _BLOCK values, sorted
or partitioned in place), so they need O(dim) extra memory, and O(n log n · dim) time for the sort.
Krum's pairwise squared distances come from the Gram matrix G = X Xᵀ in float64 (||x_i - x_j||² =
G_ii + G_jj - 2 G_ij), accumulated over the same blocks, each block's columns centred on their mean
first (distances do not change; the cancellation in G_ii + G_jj - 2 G_ij does); O(n² · dim) flops in
BLAS, O(n²) memory for G. Norm clipping goes row by row: O(dim) extra, O(n · dim) time.
"""

from __future__ import annotations

import numpy as np

_BLOCK = 1 << 18  # values (n rows × columns) per float64 working block: 2 MiB


def _children(updates: np.ndarray, weights) -> tuple[np.ndarray, slice | np.ndarray, int]:
    """(weights as float64, the rows that took part as a slice or index array, how many)."""
    weights = np.asarray(weights, dtype=np.float64)
    if updates.ndim != 2 or weights.shape != (updates.shape[0],):
        raise ValueError(f"need updates (n, dim) and n weights, got shapes {updates.shape} and {weights.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    active = np.flatnonzero(weights > 0)
    if active.size == 0:
        raise ValueError("no child has a positive weight: nothing to aggregate")
    rows: slice | np.ndarray = slice(None) if active.size == updates.shape[0] else active  # a view when all took part
    return weights, rows, int(active.size)


def _blocks(n: int, dim: int):
    """Column ranges [a, b) whose n × (b - a) float64 copy stays within _BLOCK values (one column at least)."""
    step = max(1, _BLOCK // max(n, 1))
    for a in range(0, dim, step):
        yield a, min(dim, a + step)


def _result(out: np.ndarray | None, dim: int) -> np.ndarray:
    if out is None:
        return np.empty(dim, dtype=np.float64)
    if out.dtype != np.float64 or out.shape != (dim,):
        raise ValueError(f"out must be a float64 vector of size {dim}")
    return out


def coordinate_median(updates: np.ndarray, weights, out: np.ndarray | None = None) -> np.ndarray:
    """Per-coordinate median of the children that took part (unweighted; n even: mean of the two middle values)."""
    _, rows, n = _children(updates, weights)
    out = _result(out, updates.shape[1])
    for a, b in _blocks(n, updates.shape[1]):
        block = np.array(updates[rows, a:b], dtype=np.float64)  # our copy: median may partition it in place
        np.median(block, axis=0, out=out[a:b], overwrite_input=True)
    return out


def trim_count(n: int, beta: float) -> int:
    """Values dropped at each end: floor(β·n) (the standard rounding); β in [0, 1/2) keeps n - 2k >= 1."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"trimmed mean needs 0 <= beta < 0.5, got {beta}")
    return int(np.floor(beta * n))


def trimmed_mean(updates: np.ndarray, weights, beta: float, out: np.ndarray | None = None) -> np.ndarray:
    """Per coordinate: sort the n values, drop floor(β·n) at each end, average the rest (unweighted)."""
    _, rows, n = _children(updates, weights)
    k = trim_count(n, beta)
    out = _result(out, updates.shape[1])
    for a, b in _blocks(n, updates.shape[1]):
        block = np.array(updates[rows, a:b], dtype=np.float64)
        block.sort(axis=0)
        np.mean(block[k:n - k], axis=0, out=out[a:b])
    return out


def check_krum(n: int, f: int) -> None:
    """Blanchard et al. need n > 2f + 2 (so that each child has n - f - 2 >= 1 neighbours to score)."""
    if f < 0:
        raise ValueError(f"krum: f (Byzantine children) must be >= 0, got {f}")
    if n <= 2 * f + 2:
        raise ValueError(f"krum: f={f} Byzantine children need n > 2f + 2 = {2 * f + 2} children with updates, got n={n}")


def pairwise_sq_distances(updates: np.ndarray, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
    """(n, n) squared L2 distances between the rows, from their Gram matrix in float64 (blocks of columns)."""
    n = updates.shape[0] if isinstance(rows, slice) else len(rows)
    gram = np.zeros((n, n), dtype=np.float64)
    for a, b in _blocks(n, updates.shape[1]):
        block = np.array(updates[rows, a:b], dtype=np.float64)
        block -= block.mean(axis=0)  # a shift of every row: distances are the same, cancellation is less
        gram += block @ block.T
    sq = np.diag(gram).copy()
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)  # rounding can leave -0.000...
    np.fill_diagonal(dist, 0.0)
    return dist


def krum_scores(dist: np.ndarray, f: int) -> np.ndarray:
    """Score of each child: the sum of its n - f - 2 smallest squared distances to the others."""
    n = dist.shape[0]
    check_krum(n, f)
    closest = n - f - 2
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.delete(dist[i], i)
        scores[i] = np.partition(others, closest - 1)[:closest].sum()
    return scores


def multikrum(updates: np.ndarray, weights, f: int, m: int | None = None, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Plain mean of the m children with the lowest Krum scores (m = n - f if None; m = 1 is Krum).

    Returns (the aggregate, the chosen children as indices into `updates`, best first)."""
    _, rows, n = _children(updates, weights)
    check_krum(n, f)
    m = n - f if m is None else int(m)
    if not 1 <= m <= n:
        raise ValueError(f"multikrum: m must be between 1 and the n={n} children with updates, got {m}")
    scores = krum_scores(pairwise_sq_distances(updates, rows), f)
    best = np.argsort(scores, kind="stable")[:m]
    index = np.arange(updates.shape[0])[rows]
    chosen = index[best]
    out = _result(out, updates.shape[1])
    out[:] = 0.0
    for i in chosen:
        out += updates[i].astype(np.float64, copy=False)
    out /= m
    return out, chosen


def krum(updates: np.ndarray, weights, f: int, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """The update of the child with the lowest Krum score, and that child's index."""
    agg, chosen = multikrum(updates, weights, f, m=1, out=out)
    return agg, int(chosen[0])


def norm_clipped_mean(updates: np.ndarray, weights, clip_norm: float, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """sum_i w_i · u_i · min(1, clip_norm / ||u_i||) / sum_i w_i; also returns each child's scale (1: not clipped)."""
    if not clip_norm > 0:
        raise ValueError(f"normclip: clip_norm must be > 0, got {clip_norm}")
    weights, _, _ = _children(updates, weights)
    out = _result(out, updates.shape[1])
    out[:] = 0.0
    row = np.empty(updates.shape[1], dtype=np.float64)
    scales = np.ones(updates.shape[0], dtype=np.float64)
    for i, w in enumerate(weights):
        if w <= 0:
            continue
        np.copyto(row, updates[i])
        norm = float(np.sqrt(np.dot(row, row)))
        if norm > clip_norm:
            scales[i] = clip_norm / norm
            row *= scales[i]
        row *= w
        out += row
    out /= weights.sum()
    return out, scales
