"""The device end of DP-FedAvg, as a wrapper around a link's Child (hierfed.comm.links): each
client's update is clipped to L2 norm C before it is queued, its weight becomes 1 when noise is on
(a weighted sum would let one client move it by w·C), and with distributed noise each client adds
its share N(0, (σC)²/n) of the noise, n being the clients of its aggregation — so only the sum
carries the full σC, which is what secure aggregation lets the parent see.
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
                 start_round: int, edge_rounds: int, agg_size: Callable[[int], int]) -> None:
        self.child, self.clip, self.sigma, self.uniform, self.distributed = child, float(clip), float(sigma), uniform, distributed
        self.seed, self.edge_rounds, self.agg_size = seed, edge_rounds, agg_size
        self._sends = (start_round - 1) * edge_rounds  # edge rounds sent so far, counted from round 1
        self._samples = 0.0

    @property
    def round(self) -> tuple[int, int]:
        """(cloud round, edge round) of the next send."""
        return self._sends // self.edge_rounds + 1, self._sends % self.edge_rounds + 1

    def add(self, sender: int, weight: float, delta: np.ndarray, rng: np.random.Generator | None = None) -> None:
        clipped, _ = clip_to_norm(delta, self.clip)
        self._samples += weight
        if self.distributed and self.sigma > 0:
            t, s = self.round
            std = self.sigma * self.clip / np.sqrt(max(1, self.agg_size(t)))
            clipped = (clipped + gaussian(clipped.size, std, self.seed, t, s, sender)).astype(delta.dtype)
        self.child.add(sender, 1.0 if self.uniform else weight, clipped, rng)

    def send(self) -> float:
        """Send this edge round's updates; returns their total sample count (telemetry, as Child's)."""
        sent = self.child.send()
        samples = self._samples if self.uniform else sent
        self._sends += 1
        self._samples = 0.0
        return samples

    def __getattr__(self, name: str):  # receive, feedback, state_dict, ...: the wrapped Child's
        return getattr(self.child, name)
