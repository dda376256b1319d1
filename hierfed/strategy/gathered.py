"""Strategies that must see every child's update: coordinate-wise median, trimmed mean, Krum,
Multi-Krum, norm-bounded averaging (the math and its papers: hierfed.strategy.robust).

They are not reducible (`reducible = False`): the parent gathers the children's updates (n_children,
dim) with their weights and calls `aggregate_updates`, which computes the robust aggregate and takes
the server step as FedAvg does: params + server_lr · aggregate. The total weight returned is the sum
over the children that took part (weight > 0), as FedAvg's, so the tier above weighs this parent by
the data it stands for, whichever children the rule trusted. `aggregate` (the SUM path) refuses.

Stateless across rounds (nothing to checkpoint). Krum and Multi-Krum refuse a round with n <= 2f + 2
children with updates; `min_children` says the bound so the wiring can check a topology up front.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hierfed.strategy import robust
from hierfed.strategy.base import Strategy, check_updates, unchanged

if TYPE_CHECKING:
    from hierfed.strategy.lora import LoraAggregate


class GatheredStrategy(Strategy):
    """A robust rule over the stacked updates, then params + server_lr · aggregate."""

    reducible = False
    seen = 0  # updates of weight > 0 in the last aggregation

    def __init__(self, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise ValueError(f"{self.name}: server_lr must be > 0, got {server_lr}")
        self.server_lr = float(server_lr)

    @classmethod
    def from_config(cls, cfg: Any) -> GatheredStrategy:
        return cls(server_lr=1.0 if cfg.server_lr is None else cfg.server_lr)

    def min_children(self) -> int:
        """The fewest children with updates a round needs."""
        return 1

    def robust_aggregate(self, updates: np.ndarray, weights: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The rule's aggregate update (float64, into `out`); weights > 0 for at least one child."""
        raise NotImplementedError

    def report(self) -> dict:
        """What the last aggregation decided, for the tier's metrics row ("aggregation"): the rule,
        how many updates it saw, and its own findings (Krum's picks, how many norm clipping scaled)."""
        return {"aggregation": {"rule": self.name, "updates": self.seen, **self.findings()}}

    def findings(self) -> dict:
        return {}

    def aggregate(self, params: np.ndarray, reduced: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        raise TypeError(f"{self.name} needs every child's update (the gathered path, aggregate_updates), not their sum")

    def aggregate_updates(
        self, params: np.ndarray, updates: np.ndarray, weights: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, float]:
        weights = check_updates(params, updates, weights)
        total = float(weights.sum())
        self.seen = int(np.count_nonzero(weights))
        if total <= 0:
            return unchanged(params, out), 0.0
        agg = self._mean_buffer(params.size) if out is not None else np.empty(params.size, dtype=np.float64)
        return self.step(params, self.robust_aggregate(updates, weights, agg), out), total

    def step(self, params: np.ndarray, mean_delta: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if self.server_lr != 1.0:
            mean_delta *= self.server_lr
        return np.add(params, mean_delta, out=out)


class Median(GatheredStrategy):
    """Coordinate-wise median (unweighted; n even: mean of the two middle values)."""

    name = "median"

    def robust_aggregate(self, updates: np.ndarray, weights: np.ndarray, out: np.ndarray) -> np.ndarray:
        return robust.coordinate_median(updates, weights, out=out)


class TrimmedMean(GatheredStrategy):
    """Coordinate-wise trimmed mean: floor(β·n) values dropped at each end (unweighted)."""

    name = "trimmed_mean"

    def __init__(self, server_lr: float = 1.0, beta: float = 0.2) -> None:
        super().__init__(server_lr)
        robust.trim_count(1, beta)  # checks 0 <= beta < 0.5
        self.beta = float(beta)

    @classmethod
    def from_config(cls, cfg: Any) -> TrimmedMean:
        return cls(server_lr=1.0 if cfg.server_lr is None else cfg.server_lr, beta=cfg.trim_beta)

    def robust_aggregate(self, updates: np.ndarray, weights: np.ndarray, out: np.ndarray) -> np.ndarray:
        return robust.trimmed_mean(updates, weights, self.beta, out=out)


class MultiKrum(GatheredStrategy):
    """Plain mean of the m children with the best Krum scores (m = n - f when None); `chosen`: the last round's picks."""

    name = "multikrum"

    def __init__(self, server_lr: float = 1.0, f: int = 0, m: int | None = None) -> None:
        super().__init__(server_lr)
        robust.check_krum(2 * f + 3, f)  # checks f >= 0
        if m is not None and m < 1:
            raise ValueError(f"{self.name}: m must be >= 1, got {m}")
        self.f, self.m = int(f), m
        self.chosen: np.ndarray | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> MultiKrum:
        return cls(server_lr=1.0 if cfg.server_lr is None else cfg.server_lr, f=cfg.krum_f, m=cfg.multikrum_m)

    def min_children(self) -> int:
        return max(2 * self.f + 3, self.m or 1)

    def robust_aggregate(self, updates: np.ndarray, weights: np.ndarray, out: np.ndarray) -> np.ndarray:
        agg, self.chosen = robust.multikrum(updates, weights, self.f, self.m, out=out)
        return agg

    def findings(self) -> dict:
        """The rows averaged (indices into the round's updates: children in rank order, each child's senders in order)."""
        return {} if self.chosen is None else {"chosen": [int(i) for i in self.chosen]}


class Krum(MultiKrum):
    """The update of the one child with the best Krum score (Multi-Krum with m = 1)."""

    name = "krum"

    def __init__(self, server_lr: float = 1.0, f: int = 0) -> None:
        super().__init__(server_lr, f=f, m=1)

    @classmethod
    def from_config(cls, cfg: Any) -> Krum:
        return cls(server_lr=1.0 if cfg.server_lr is None else cfg.server_lr, f=cfg.krum_f)


class NormClip(GatheredStrategy):
    """Each update clipped to L2 norm <= clip_norm, then the weighted mean; `scales`: the last round's factors."""

    name = "normclip"

    def __init__(self, clip_norm: float, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        if not clip_norm > 0:
            raise ValueError(f"{self.name}: clip_norm must be > 0, got {clip_norm}")
        self.clip_norm = float(clip_norm)
        self.scales: np.ndarray | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> NormClip:
        if cfg.clip_norm is None:
            raise ValueError("normclip needs clip_norm")
        return cls(clip_norm=cfg.clip_norm, server_lr=1.0 if cfg.server_lr is None else cfg.server_lr)

    def robust_aggregate(self, updates: np.ndarray, weights: np.ndarray, out: np.ndarray) -> np.ndarray:
        agg, self.scales = robust.norm_clipped_mean(updates, weights, self.clip_norm, out=out)
        return agg

    def findings(self) -> dict:
        return {} if self.scales is None else {"clipped": int(np.count_nonzero(self.scales < 1))}


class LoraExact(GatheredStrategy):
    """Exact LoRA aggregation (FedEx-LoRA style; the math: hierfed.strategy.lora): per LoRA module
    ΔW = Σ w_i B_i A_i / Σ w_i over the children's full factors (the parent's params + each update),
    re-factorised to the module's rank r by truncated SVD; other entries (a head, biases) get the
    weighted mean, as FedAvg. Sample-weighted like FedAvg, not robust: it is on the gathered path
    because a product of factors is not a function of their sums.

    It needs the layout of the flat vector (`set_layout(manifest)`: FlatView.manifest(), sent in the
    start-up Plan). `last`: the last aggregation (LoraAggregate), whose residual energy — the fraction
    of Σ ||ΔW||_F² the rank-r truncation dropped — goes into the tier's metrics row. server_lr η:
    params + η · (exact result - params)."""

    name = "lora_exact"

    def __init__(self, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        self.manifest: list[tuple[str, tuple[int, ...]]] | None = None
        self.last: LoraAggregate | None = None

    def set_layout(self, manifest: list[tuple[str, tuple[int, ...]]]) -> None:
        from hierfed.strategy.lora import lora_modules

        modules = lora_modules(manifest)  # every A with its B, of consistent shapes
        if not modules:
            raise ValueError("lora_exact: the trainable vector has no LoRA factors (peft.method must be lora, without ffa_lora)")
        self.manifest = list(manifest)

    def aggregate_updates(
        self, params: np.ndarray, updates: np.ndarray, weights: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, float]:
        from hierfed.strategy.lora import aggregate_lora_exact

        if self.manifest is None:
            raise RuntimeError("lora_exact: set_layout was never called (the wiring must pass the model's manifest)")
        weights = check_updates(params, updates, weights)
        total = float(weights.sum())
        self.seen = int(np.count_nonzero(weights))
        if total <= 0:
            return unchanged(params, out), 0.0
        self.last = aggregate_lora_exact(updates, weights, self.manifest, base=params)
        new = self.last.params
        if self.server_lr != 1.0:
            new -= params
            new *= self.server_lr
            new += params
        if out is None:
            return new, total
        np.copyto(out, new)
        return out, total

    def findings(self) -> dict:
        if self.last is None:
            return {}
        per_module = self.last.residuals
        return {"residual_energy": self.last.residual_total, "residual_energy_max": max(per_module.values(), default=0.0)}
