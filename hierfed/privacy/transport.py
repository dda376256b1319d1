"""The device end of DP-FedAvg, as a wrapper around a link's Child (hierfed.comm.links): each
client's update is clipped to L2 norm C before it is queued, its weight becomes 1 when noise is on
(a weighted sum would let one client move it by w·C), and with distributed noise each client adds
its share N(0, (σC)²/n) of the noise, n being the clients of its aggregation — so only the sum
carries the full σC, which is what secure aggregation lets the parent see.

With adaptive clipping (privacy.adaptive_clip) C is the parent's: each round the device receives it
after the parameters (one float64 broadcast) and, after its update, sends Σ_c (b_c − ½) over its
clients, b_c = 1[‖Δ_c‖ <= C] (one float64 Reduce); `AdaptiveParent` is the parent's end, and the
parent's NoisySum noises the count and moves C (hierfed.privacy.noise.adapt).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hierfed.comm.links import Child
from hierfed.privacy.clip import clip_to_norm
from hierfed.privacy.noise import gaussian


class PrivateChild:
    """A Child whose senders are clipped (and, for distributed noise, noised) clients.

    `agg_size(t)`: the number of clients in the aggregation this rank's clients join in cloud round t
    (their edge's sampled clients; all sampled clients when flat). The round and edge round are
    counted here from `start_round`, one edge round per `send`."""

    def __init__(self, child: Child, clip: float, sigma: float, uniform: bool, distributed: bool, seed: int,
                 start_round: int, edge_rounds: int, agg_size: Callable[[int], int], adaptive: bool = False) -> None:
        self.child, self.clip, self.sigma, self.uniform, self.distributed = child, float(clip), float(sigma), uniform, distributed
        self.adaptive = adaptive
        self._bits = 0.0  # Σ(b_c − ½) of this edge round's clients (adaptive clipping)
        self.seed, self.edge_rounds, self.agg_size = seed, edge_rounds, agg_size
        self._sends = (start_round - 1) * edge_rounds  # edge rounds sent so far, counted from round 1
        self._samples = 0.0

    @property
    def round(self) -> tuple[int, int]:
        """(cloud round, edge round) of the next send."""
        return self._sends // self.edge_rounds + 1, self._sends % self.edge_rounds + 1

    def add(self, sender: int, weight: float, delta: np.ndarray, rng: np.random.Generator | None = None) -> None:
        clipped, norm = clip_to_norm(delta, self.clip)
        self._bits += (1.0 if norm <= self.clip else 0.0) - 0.5
        self._samples += weight
        if self.distributed and self.sigma > 0:
            t, s = self.round
            std = self.sigma * self.clip / np.sqrt(max(1, self.agg_size(t)))
            clipped = (clipped + gaussian(clipped.size, std, self.seed, t, s, sender)).astype(delta.dtype)
        self.child.add(sender, 1.0 if self.uniform else weight, clipped, rng)

    def receive(self, out: np.ndarray) -> None:
        """The parent's parameters into `out`; with adaptive clipping, then this round's C."""
        self.child.receive(out)
        if self.adaptive:
            buf = np.zeros(1, dtype=np.float64)
            self.child.channel.bcast(buf)
            self.clip = float(buf[0])

    def send(self) -> float:
        """Send this edge round's updates; returns their total sample count (telemetry, as Child's)."""
        sent = self.child.send()
        if self.adaptive:
            self.child.channel.reduce_sum(np.array([self._bits], dtype=np.float64))
            self._bits = 0.0
        samples = self._samples if self.uniform else sent
        self._sends += 1
        self._samples = 0.0
        return samples

    def __getattr__(self, name: str):  # receive, feedback, state_dict, ...: the wrapped Child's
        return getattr(self.child, name)


class AdaptiveParent:
    """The parent's end of adaptive clipping, around its Parent link: after the parameters it
    broadcasts the clip norm C its NoisySum keeps; after the updates it receives the devices'
    Σ(b_c − ½) and hands it to the NoisySum, which noises it and moves C when it aggregates."""

    def __init__(self, parent, strategy) -> None:
        self.parent, self.strategy = parent, strategy
        self.used = strategy.clip  # C of the last aggregation (for its row)

    def send(self, params: np.ndarray, receivers: int | None = None, rng: np.random.Generator | None = None) -> None:
        self.parent.send(params, receivers, rng)
        self.used = self.strategy.clip
        self.parent.channel.bcast(np.array([self.used], dtype=np.float64), receivers)

    def receive(self) -> np.ndarray:
        total = self.parent.receive()
        bits = np.zeros(1, dtype=np.float64)
        self.parent.channel.reduce_sum(bits)
        self.strategy.bits = float(bits[0])
        return total

    def report(self) -> dict:
        """The row's account: the clip norm C the devices clipped to (and SecAgg's, if it is inside)."""
        return {**getattr(self.parent, "report", dict)(), "clip": self.used}

    def __getattr__(self, name: str):  # state_dict, channel, decode_s, ...: the wrapped Parent's
        return getattr(self.parent, name)
