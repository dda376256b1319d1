"""Gaussian noise on a tier's SUM of clipped updates (DP-FedAvg, McMahan et al. 2018), as a wrapper
around the tier's Strategy: the children's contributions [Σ Δ_c, n] arrive summed; N(0, (σC)²) is
added to Σ Δ_c once, before the wrapped strategy divides by n — so the mean carries noise of std
σC/n, and whatever the strategy does after (server momentum, Adam) is post-processing.

With adaptive clipping (Andrew et al. 2021) the wrapper also keeps the clip norm C: the parent's
link (hierfed.privacy.transport.AdaptiveParent) sends C to the devices before each aggregation (via
the edges when this is the cloud over edges) and hands back Σ_c (b_c − ½) over all the
aggregation's clients, b_c = 1[‖Δ_c‖ <= C]; here that sum gets N(0, σ_b²) and
C <- C·exp(−η(b̄ − γ)), b̄ = (Σ(b_c − ½) + noise)/n + ½ (`noised_fraction`, `adapt`).

The noise is drawn from (seed, tier, rank, aggregation count): reproducible, and exact across a
resume (the count and C are part of the strategy's checkpointed state). A real deployment draws it from the
operating system's CSPRNG instead (docs/privacy.md).
"""

from __future__ import annotations

import numpy as np

from hierfed.strategy import Strategy


def gaussian(shape: int, std: float, *seed: int) -> np.ndarray:
    """N(0, std²) in float64 from a seed tuple (the same on every machine)."""
    return np.random.default_rng([*seed, 0xD1FF]).standard_normal(shape) * std


def noised_fraction(centered: float, n: float, noise: float) -> float:
    """b̄ = (Σ(b − ½) + noise)/n + ½: the noised fraction of the n clients whose update norm was <= C."""
    return (centered + noise) / n + 0.5


def adapt(clip: float, fraction: float, quantile: float, lr: float) -> float:
    """Andrew et al. 2021's geometric update of the clip norm from the noised fraction b̄:
    C·exp(−lr·(b̄ − quantile))."""
    return float(clip * np.exp(-lr * (fraction - quantile)))


class NoisySum(Strategy):
    """`inner` with N(0, (σC)²) added to the summed update before it is averaged. σ = 0: no noise,
    the inner strategy's numbers exactly. `adaptive` (quantile, lr, count_stddev): C adapts."""

    def __init__(self, inner: Strategy, sigma: float, clip: float, seed: int, who: int, adaptive=None) -> None:
        if not inner.reducible:
            raise ValueError(f"DP noise is added to a SUM; {inner.name} must see every update")
        self.inner, self.sigma, self.clip, self.seed, self.who = inner, float(sigma), float(clip), seed, who
        self.name, self.reducible = f"dp({inner.name})", True
        self.calls = 0  # aggregations so far: the noise's seed
        self.adaptive = adaptive
        self.bits: float | None = None  # Σ(b_c − ½) of this aggregation's clients, from AdaptiveParent
        self.fraction: float | None = None  # b̄ of the last aggregation (its row's `unclipped`)

    @property
    def std(self) -> float:
        """The noise std on the sum: σ·C."""
        return self.sigma * self.clip

    def aggregate(self, params: np.ndarray, reduced: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        n = float(reduced[-1])
        if self.sigma > 0 and n > 0:  # no client: the parent keeps its parameters
            noise = gaussian(reduced.size - 1, self.std, self.seed, self.who, self.calls)
            np.add(reduced[:-1], noise, out=reduced[:-1], casting="unsafe")
        if self.adaptive is not None:
            if self.bits is None:
                raise RuntimeError("adaptive clipping: the clipped-count of this aggregation never arrived (AdaptiveParent)")
            if n > 0:
                a = self.adaptive
                count_noise = float(gaussian(1, a.count_stddev, self.seed, self.who, self.calls, 0xB17)[0])
                self.fraction = noised_fraction(self.bits, n, count_noise)
                self.clip = adapt(self.clip, self.fraction, a.quantile, a.lr)
            else:  # no client: C stays, and no fraction was released
                self.fraction = None
            self.bits = None
        self.calls += 1
        return self.inner.aggregate(params, reduced, out)

    def step(self, params: np.ndarray, mean_delta: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self.inner.step(params, mean_delta, out)

    def report(self) -> dict:
        """The row's account, with adaptive clipping: `unclipped`, the noised fraction b̄ that moved
        C in this aggregation (a function of the noised count, so it reveals nothing C does not)."""
        own = {} if self.adaptive is None else {"unclipped": self.fraction}
        return {**getattr(self.inner, "report", dict)(), **own}

    def state_dict(self) -> dict[str, np.ndarray]:
        extra = {} if self.adaptive is None else {"dp_clip": np.array([self.clip], dtype=np.float64)}
        return {**self.inner.state_dict(), "dp_calls": np.array([self.calls], dtype=np.int64), **extra}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        state = dict(state)
        self.calls = int(state.pop("dp_calls", np.zeros(1))[0])
        if "dp_clip" in state:
            self.clip = float(state.pop("dp_clip")[0])
        self.inner.load_state_dict(state)
