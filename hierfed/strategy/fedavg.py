"""FedAvg (McMahan et al. 2017) and FedAvg with server momentum (Hsu et al. 2019)."""

from __future__ import annotations

from typing import Any

import numpy as np

from hierfed.strategy.base import Strategy


class FedAvg(Strategy):
    """params + server_lr * weighted-mean delta; server_lr = 1 is plain federated averaging."""

    name = "fedavg"
    blockwise = True

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    @classmethod
    def from_config(cls, cfg: Any) -> FedAvg:
        return cls(server_lr=1.0 if cfg.server_lr is None else cfg.server_lr)

    def step(self, params: np.ndarray, mean_delta: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if self.server_lr != 1.0:
            mean_delta *= self.server_lr  # aggregate's buffer: scaled in place
        return np.add(params, mean_delta, out=out)

    def step_block(self, params: np.ndarray, mean_delta: np.ndarray, out: np.ndarray, part: slice) -> None:
        self.step(params, mean_delta, out)


class FedAvgM(Strategy):
    """Server momentum: v = beta * v + delta; params += server_lr * v. State is checkpointed."""

    name = "fedavgm"
    blockwise = True

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        self.server_lr = server_lr
        self.momentum = momentum
        self.velocity: np.ndarray | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> FedAvgM:
        return cls(server_lr=1.0 if cfg.server_lr is None else cfg.server_lr, momentum=cfg.momentum)

    def step(self, params: np.ndarray, mean_delta: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if self.velocity is None:
            self.velocity = np.zeros_like(mean_delta)
        return self._step(params, mean_delta, out, self.velocity)

    def begin_blocks(self, dim: int) -> None:
        if self.velocity is None:
            self.velocity = np.zeros(dim, dtype=np.float64)  # what step makes from aggregate's float64 mean

    def step_block(self, params: np.ndarray, mean_delta: np.ndarray, out: np.ndarray, part: slice) -> None:
        assert self.velocity is not None  # begin_blocks made it
        self._step(params, mean_delta, out, self.velocity[part])

    def _step(self, params: np.ndarray, mean_delta: np.ndarray, out: np.ndarray | None, velocity: np.ndarray) -> np.ndarray:
        velocity *= self.momentum
        velocity += mean_delta
        if self.server_lr == 1.0:  # 1.0 * v == v exactly
            return np.add(params, velocity, out=out)
        spent = mean_delta if mean_delta.dtype == velocity.dtype else None  # reuse the spent mean delta
        scaled = np.multiply(velocity, self.server_lr, out=spent)
        return np.add(params, scaled, out=out)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.velocity = state.get("velocity")
