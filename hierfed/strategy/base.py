"""The Strategy interface: what a child contributes, and how the parent turns the sum into a model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


def weighted_mean(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Reference FedAvg mean: sum_i w_i v_i / sum_i w_i (float64). Used by tests and by strategies."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weighted_mean needs a positive total weight")
    acc = np.zeros_like(vectors[0], dtype=np.float64)
    for v, w in zip(vectors, weights):
        acc += float(w) * v
    return acc / total


class Strategy(ABC):
    """Aggregation at one tier over flat parameter vectors.

    Parents keep their parameters in float64 (the master copy) and send float32; aggregation
    divides in float64, so a hierarchy adds no rounding that flat FedAvg does not have.

    Wire format of a contribution (float32, length `payload_size(dim)`): [w * delta, w], where
    delta = local params - params the child started from, and w its weight (sample count).
    Summing contributions over children gives [sum w_i delta_i, sum w_i] at the parent, in one
    MPI Reduce. A child with nothing to contribute sends zeros (weight 0).
    """

    name: str = "strategy"

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
        delta, total = self.mean_delta(reduced, out=self._mean_buffer(params.size) if out is not None else None)
        if delta is None:
            if out is None or out is params:
                return params, 0.0
            np.copyto(out, params)
            return out, 0.0
        return self.step(params, delta, out), total

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

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        pass
