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
    def accumulate(acc: np.ndarray, delta: np.ndarray, weight: float) -> None:
        """acc += contribution(delta, weight): how a rank with many virtual clients sums locally."""
        acc[:-1] += weight * delta
        acc[-1] += weight

    @staticmethod
    def mean_delta(reduced: np.ndarray) -> tuple[np.ndarray | None, float]:
        """[sum w delta, sum w] -> (weighted mean delta in float64, total weight); None if weight 0."""
        total = float(reduced[-1])
        if total <= 0:
            return None, 0.0
        return np.divide(reduced[:-1], total, dtype=np.float64), total  # one pass, in float64

    def aggregate(self, params: np.ndarray, reduced: np.ndarray) -> tuple[np.ndarray, float]:
        """New parameters from the summed contributions; unchanged params when no child trained."""
        delta, total = self.mean_delta(reduced)
        if delta is None:
            return params, 0.0
        return self.step(params, delta), total

    @abstractmethod
    def step(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        """The server optimiser: apply the mean client delta (a pseudo-gradient, negated); float64."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        pass
