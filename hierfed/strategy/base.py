"""The Strategy interface: what a child contributes, and how the parent turns the sum into a model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

BLOCK = 16384  # values per block of the blockwise passes: a few float64 blocks stay in a core's L2


def weighted_mean(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Reference FedAvg mean: sum_i w_i v_i / sum_i w_i (float64). Used by tests and by strategies."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weighted_mean needs a positive total weight")
    acc = np.zeros_like(vectors[0], dtype=np.float64)
    for v, w in zip(vectors, weights):
        acc += float(w) * v
    return acc / total


def check_updates(params: np.ndarray, updates: np.ndarray, weights) -> np.ndarray:
    """The gathered path's inputs, checked: updates (n, dim) with dim = params.size, n finite weights >= 0.

    Returns the weights as a float64 array."""
    weights = np.asarray(weights, dtype=np.float64)
    if updates.ndim != 2 or updates.shape[1] != params.size:
        raise ValueError(f"updates must be (n_children, {params.size}), got shape {updates.shape}")
    if weights.shape != (updates.shape[0],):
        raise ValueError(f"{updates.shape[0]} updates but {weights.size} weights")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    return weights


def unchanged(params: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """What a parent holds when no child trained: params, or a copy of them in `out`."""
    if out is None or out is params:
        return params
    np.copyto(out, params)
    return out


class Strategy(ABC):
    """Aggregation at one tier over flat parameter vectors.

    Parents keep their parameters in float64 (the master copy) and send float32; aggregation
    divides in float64, so a hierarchy adds no rounding that flat FedAvg does not have.

    Wire format of a contribution (float32, length `payload_size(dim)`): [w * delta, w], where
    delta = local params - params the child started from, and w its weight (sample count).
    Summing contributions over children gives [sum w_i delta_i, sum w_i] at the parent, in one
    MPI Reduce. A child with nothing to contribute sends zeros (weight 0).

    `reducible` says whether the rule works on that SUM. Rules that must see every child's update
    (median, Krum, ...: hierfed.strategy.gathered) set it False; the parent gathers the children's
    updates instead and calls `aggregate_updates`, which every strategy answers.
    """

    name: str = "strategy"
    reducible: bool = True
    # `step` works value by value (FedAvg, FedAvgM): `aggregate(out=...)` then divides and steps one
    # block of BLOCK values at a time (`step_block`), so the mean delta never goes through memory.
    blockwise: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> Strategy:
        return cls()

    @staticmethod
    def payload_size(dim: int) -> int:
        return dim + 1

    @staticmethod
    def contribution(delta: np.ndarray, weight: float, out: np.ndarray | None = None) -> np.ndarray:
        """Write [weight * delta, weight] into `out` (allocated if None) and return it."""
        if out is None:
            out = np.empty(delta.size + 1, dtype=np.float32)
        np.multiply(delta, weight, out=out[:-1], casting="unsafe")
        out[-1] = weight
        return out

    @staticmethod
    def accumulate(acc: np.ndarray, delta: np.ndarray, weight: float, scratch: np.ndarray | None = None) -> None:
        """acc += contribution(delta, weight): how a rank with many virtual clients sums locally.

        `scratch`, if given, holds weight * delta instead of a fresh temporary: a buffer of delta's
        size and of dtype `np.result_type(delta, weight)` (see `scratch_dtype`), so the numbers are
        the same as without it.
        """
        if scratch is None:
            acc[:-1] += weight * delta
        else:
            np.add(acc[:-1], np.multiply(delta, weight, out=scratch), out=acc[:-1])
        acc[-1] += weight

    @staticmethod
    def accumulate_difference(acc: np.ndarray, new: np.ndarray, base: np.ndarray, weight: float) -> None:
        """acc += contribution(new - base, weight), with the same numbers as `accumulate` on the
        difference, but one block at a time: the difference and its weighted form stay in cache
        and no array of the model's size is written besides `acc` (an edge's whole chain: its new
        master copy minus the parameters it started from, scaled, into the sum it sends up)."""
        diff_t = np.result_type(new, base)
        prod_t = np.result_type(np.empty(0, dtype=diff_t), weight)
        diff = np.empty(min(BLOCK, new.size), dtype=diff_t)
        prod = diff if prod_t == diff_t else np.empty(diff.size, dtype=prod_t)
        sums = acc[:-1]
        for i in range(0, new.size, BLOCK):
            j = min(i + BLOCK, new.size)
            d = np.subtract(new[i:j], base[i:j], out=diff[: j - i])
            np.add(sums[i:j], np.multiply(d, weight, out=prod[: j - i]), out=sums[i:j])
        acc[-1] += weight

    @staticmethod
    def scratch_dtype(delta: np.ndarray, weight: float) -> np.dtype:
        """The dtype of weight * delta, i.e. of the `scratch` that `accumulate` takes."""
        return np.result_type(delta, weight)

    @staticmethod
    def mean_delta(reduced: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray | None, float]:
        """[sum w delta, sum w] -> (weighted mean delta in float64, total weight); None if weight 0.

        `out`: a float64 buffer of the delta's size to write the mean into (else a new array)."""
        total = float(reduced[-1])
        if total <= 0:
            return None, 0.0
        return np.divide(reduced[:-1], total, out=out, dtype=np.float64), total  # one pass, in float64

    def aggregate(self, params: np.ndarray, reduced: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """New parameters from the summed contributions; unchanged params when no child trained.

        With `out` (a float64 buffer of params' size, `params` itself allowed) the new parameters
        are written there and no full-size array is allocated: the mean delta goes into a buffer the
        strategy keeps from round to round. Without it they are a new array and params is untouched.
        """
        if out is not None and self.blockwise:
            return self._aggregate_blocks(params, reduced, out)
        delta, total = self.mean_delta(reduced, out=self._mean_buffer(params.size) if out is not None else None)
        if delta is None:
            if out is None or out is params:
                return params, 0.0
            np.copyto(out, params)
            return out, 0.0
        return self.step(params, delta, out), total

    def aggregate_updates(
        self, params: np.ndarray, updates: np.ndarray, weights: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, float]:
        """New parameters from every child's update: `updates` (n_children, dim), `weights` (n_children,).

        The gathered path. For a reducible rule it is `aggregate` on what the SUM would have held:
        step(params, sum_i w_i u_i / sum_i w_i), accumulated in float64 row by row (O(dim) extra).
        Children of weight 0 took no part; with none left, params are unchanged (as `aggregate`).
        `out` as in `aggregate`. Returns (new params, total weight).
        """
        weights = check_updates(params, updates, weights)
        total = float(weights.sum())
        if total <= 0:
            return unchanged(params, out), 0.0
        mean = self._mean_buffer(params.size) if out is not None else np.empty(params.size, dtype=np.float64)
        mean[:] = 0.0
        for row, w in zip(updates, weights):
            if w > 0:
                mean += float(w) * row.astype(np.float64, copy=False)  # one row's temporaries: O(dim)
        mean /= total
        return self.step(params, mean, out), total

    def _aggregate_blocks(self, params: np.ndarray, reduced: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, float]:
        """`aggregate(out=...)` of a blockwise rule: per block, the float64 mean (as `mean_delta`)
        and `step_block`; the same numbers as dividing and stepping whole arrays."""
        total = float(reduced[-1])
        if total <= 0:
            return unchanged(params, out), 0.0
        self.begin_blocks(params.size)
        mean = self._mean_buffer(min(BLOCK, params.size))
        for i in range(0, params.size, BLOCK):
            j = min(i + BLOCK, params.size)
            part = slice(i, j)
            self.step_block(params[part], np.divide(reduced[part], total, out=mean[: j - i], dtype=np.float64), out[part], part)
        return out, total

    def begin_blocks(self, dim: int) -> None:  # noqa: B027 (stateless rules need not override)
        """Before the blocks of one blockwise step: make the model-sized state (FedAvgM's velocity)."""

    def step_block(self, params: np.ndarray, mean_delta: np.ndarray, out: np.ndarray, part: slice) -> None:
        """`step` on the values `part` of the model (blockwise rules): `params`, `mean_delta` and
        `out` are those values; the rule's own state is indexed with `part`."""
        raise NotImplementedError(f"{self.name} does not step block by block")

    def _mean_buffer(self, dim: int) -> np.ndarray:
        """The float64 mean delta of `aggregate(out=...)`, reused across rounds."""
        buf = getattr(self, "_mean", None)  # subclasses need not call Strategy.__init__
        if buf is None or buf.size != dim:
            buf = self._mean = np.empty(dim, dtype=np.float64)
        return buf

    @abstractmethod
    def step(self, params: np.ndarray, mean_delta: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The server optimiser: apply the mean client delta (a pseudo-gradient, negated); float64.

        Writes the new parameters into `out` (may be `params`) if given, else returns a new array.
        May overwrite `mean_delta` (aggregate passes its own buffer)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:  # noqa: B027 (stateless rules need not override)
        pass
