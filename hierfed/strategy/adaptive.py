"""FedAdagrad, FedYogi and FedAdam: adaptive server optimisers (Reddi et al. 2021, "Adaptive Federated
Optimization", ICLR, arXiv:2003.00295, Algorithm 2).

The parent treats the weighted mean client delta Δ_t as a pseudo-gradient (negated) and takes one
adaptive step per round, exactly as Algorithm 2 writes it (no bias correction):

    m_t = β1 m_{t-1} + (1 - β1) Δ_t                                   m_{-1} = 0
    v_t = v_{t-1} + Δ_t²                                  FedAdagrad   v_{-1} = τ²
    v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)    FedYogi
    v_t = β2 v_{t-1} + (1 - β2) Δ_t²                      FedAdam
    x_{t+1} = x_t + η m_t / (√v_t + τ)

η is `server_lr`, τ the adaptivity (smaller: more adaptive). The paper initialises v_{-1} ≥ τ²; we
take v_{-1} = τ² (Flower starts from 0, which differs from this only in the first rounds' v). The
paper's Δ_t is the plain mean over the sampled clients; here it is the sample-weighted mean of the
tier (equal weights give the paper's). Defaults for η and τ are Flower's: FedAdam and FedAdagrad
η = 0.1, τ = 1e-9; FedYogi η = 0.01, τ = 1e-3; β1 = 0.9, β2 = 0.99 (the paper's, and Flower's for
Adam and Yogi; Flower's FedAdagrad fixes β1 = 0, which `beta1: 0` gives here).

State: m and v (float64, one each per parameter), checkpointed through state_dict. Memory: m, v and
one float64 scratch vector kept across rounds, 3 × 8 bytes per parameter; a step allocates nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hierfed.strategy.base import Strategy


class _Adaptive(Strategy):
    """Algorithm 2's shared part: the first moment m, the update x + η m / (√v + τ); subclasses update v."""

    default_server_lr = 0.1
    default_tau = 1e-9

    def __init__(self, server_lr: float | None = None, beta1: float = 0.9, beta2: float = 0.99, tau: float | None = None) -> None:
        self.server_lr = self.default_server_lr if server_lr is None else float(server_lr)
        self.tau = self.default_tau if tau is None else float(tau)
        self.beta1, self.beta2 = float(beta1), float(beta2)
        if not (self.server_lr > 0 and self.tau > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"{self.name}: need server_lr > 0, tau > 0, 0 <= beta1, beta2 < 1 "
                             f"(got {self.server_lr}, {self.tau}, {self.beta1}, {self.beta2})")
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None
        self._scratch: np.ndarray | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> _Adaptive:
        return cls(server_lr=cfg.server_lr, beta1=cfg.beta1, beta2=cfg.beta2, tau=cfg.tau)

    def _update_v(self, v: np.ndarray, delta_sq: np.ndarray, scratch: np.ndarray) -> None:
        """v_{t-1} -> v_t in place, from Δ_t² (may be overwritten); `scratch` is free float64 space."""
        raise NotImplementedError

    def step(self, params: np.ndarray, mean_delta: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        delta = mean_delta if mean_delta.dtype == np.float64 else mean_delta.astype(np.float64)
        if self.m is None or self.v is None:
            self.m = np.zeros(delta.size, dtype=np.float64)  # m_{-1} = 0
            self.v = np.full(delta.size, self.tau**2, dtype=np.float64)  # v_{-1} = τ² (Algorithm 2: v_{-1} ≥ τ²)
        if self._scratch is None or self._scratch.size != delta.size:
            self._scratch = np.empty(delta.size, dtype=np.float64)
        m, v, scratch = self.m, self.v, self._scratch
        m *= self.beta1  # m_t = β1 m_{t-1} + (1 - β1) Δ_t
        m += np.multiply(delta, 1.0 - self.beta1, out=scratch)
        np.multiply(delta, delta, out=delta)  # Δ_t², in the spent delta's buffer
        self._update_v(v, delta, scratch)
        np.sqrt(v, out=scratch)  # x_t + η m_t / (√v_t + τ), evaluated in that order
        scratch += self.tau
        np.multiply(m, self.server_lr, out=delta)
        np.divide(delta, scratch, out=delta)
        return np.add(params, delta, out=out)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {} if self.m is None or self.v is None else {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if ("m" in state) != ("v" in state):
            raise ValueError(f"{self.name} state needs both m and v, got {sorted(state)}")
        self.m = None if "m" not in state else np.array(state["m"], dtype=np.float64)
        self.v = None if "v" not in state else np.array(state["v"], dtype=np.float64)


class FedAdagrad(_Adaptive):
    """v_t = v_{t-1} + Δ_t²: the accumulated squares (β2 unused)."""

    name = "fedadagrad"

    def _update_v(self, v: np.ndarray, delta_sq: np.ndarray, scratch: np.ndarray) -> None:
        v += delta_sq


class FedYogi(_Adaptive):
    """v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²): v moves towards Δ_t² by an additive step (sign(0) = 0)."""

    name = "fedyogi"
    default_server_lr = 0.01
    default_tau = 1e-3

    def _update_v(self, v: np.ndarray, delta_sq: np.ndarray, scratch: np.ndarray) -> None:
        np.subtract(v, delta_sq, out=scratch)
        np.sign(scratch, out=scratch)
        delta_sq *= 1.0 - self.beta2  # (1 - β2) Δ_t² ...
        delta_sq *= scratch  # ... times a sign (exact: ±1 or 0)
        v -= delta_sq


class FedAdam(_Adaptive):
    """v_t = β2 v_{t-1} + (1 - β2) Δ_t²: an exponential moving average of the squares."""

    name = "fedadam"

    def _update_v(self, v: np.ndarray, delta_sq: np.ndarray, scratch: np.ndarray) -> None:
        v *= self.beta2
        delta_sq *= 1.0 - self.beta2
        v += delta_sq
