"""The device end of DP-FedAvg, as a wrapper around a link's Child (hierfed.comm.links): each
client's update is clipped to L2 norm C before it is queued, its weight becomes 1 when noise is on
(a weighted sum would let one client move it by w·C), and with distributed noise each client adds
its share N(0, (σC)²/n) of the noise, n being the clients of its aggregation — so only the sum
carries the full σC, which is what secure aggregation lets the parent see.

With adaptive clipping (privacy.adaptive_clip) C is kept by the tier that adds the noise, in its
NoisySum, and two float64 collectives travel on every link between it and the devices, the same
at every tier: C after the parameters (a broadcast), Σ_c (b_c − ½) over the clients below after the
update (a Reduce), b_c = 1[‖Δ_c‖ <= C]. `AdaptiveParent` is a parent's end, `PrivateChild` the
device's. When the cloud adds the noise over edges, each edge passes both on (`RelayChild` on its
uplink, a `ClipRelay` in place of the NoisySum under its AdaptiveParent): C down to its devices, the
devices' sum up to the cloud, where the sums of all edges arrive summed. The noising tier's NoisySum
noises the count and moves C (hierfed.privacy.noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import numpy as np

from hierfed.comm.links import Child
from hierfed.privacy.clip import clip_to_norm
from hierfed.privacy.noise import gaussian


def send_clip(channel, clip: float, receivers: int | None = None) -> None:
    """A parent's C to its children, after the parameters (one float64, counted like them)."""
    channel.bcast(np.array([clip], dtype=np.float64), receivers)


def receive_clip(channel) -> float:
    """A child's end of `send_clip`."""
    buf = np.zeros(1, dtype=np.float64)
    channel.bcast(buf)
    return float(buf[0])


def send_count(channel, centered: float) -> None:
    """A child's Σ(b_c − ½) to its parent, after its update (one float64 Reduce: the parent gets the sum)."""
    channel.reduce_sum(np.array([centered], dtype=np.float64))


def receive_count(channel) -> float:
    """A parent's end of `send_count`: the children's Σ(b_c − ½), summed."""
    buf = np.zeros(1, dtype=np.float64)
    channel.reduce_sum(buf)
    return float(buf[0])


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
            self.clip = receive_clip(self.child.channel)

    def send(self) -> float:
        """Send this edge round's updates; returns their total sample count (telemetry, as Child's)."""
        sent = self.child.send()
        if self.adaptive:
            send_count(self.child.channel, self._bits)
            self._bits = 0.0
        samples = self._samples if self.uniform else sent
        self._sends += 1
        self._samples = 0.0
        return samples

    def __getattr__(self, name: str):  # receive, feedback, state_dict, ...: the wrapped Child's
        return getattr(self.child, name)


class ClipKeeper(Protocol):
    """What keeps adaptive clipping's C above a parent's link: the noising tier's NoisySum, or an
    edge's ClipRelay when the cloud adds the noise."""

    clip: float  # C for this aggregation's clients
    bits: float | None  # Σ(b_c − ½) of this aggregation's clients, once their updates are in


class ClipRelay:
    """An edge's part in adaptive clipping when the cloud adds the noise (noise_at: cloud over
    edges, where the edges are trusted and pass their devices' sum on unchanged): the C the cloud
    sent this round, which the edge's AdaptiveParent passes to its devices, and the devices'
    Σ(b_c − ½) it hands back, which the edge's RelayChild passes to the cloud. No noise here."""

    def __init__(self) -> None:
        self.clip = math.nan  # until the cloud's first C arrives
        self.bits: float | None = None


class RelayChild:
    """An edge's uplink to the cloud under adaptive clipping with the noise at the cloud: the
    cloud's C arrives after the parameters (into the ClipRelay), and the edge's devices' Σ(b_c − ½)
    leaves after the edge's update — the same two collectives as a device's PrivateChild, so the
    cloud's AdaptiveParent receives the sum over all edges' clients."""

    def __init__(self, child, relay: ClipRelay) -> None:
        self.child, self.relay = child, relay

    def receive(self, out: np.ndarray) -> None:
        self.child.receive(out)
        self.relay.clip = receive_clip(self.child.channel)

    def send(self) -> float:
        sent = self.child.send()
        if self.relay.bits is None:
            raise RuntimeError("adaptive clipping: the edge's devices' clipped-count never arrived (AdaptiveParent)")
        send_count(self.child.channel, self.relay.bits)
        self.relay.bits = None
        return sent

    def __getattr__(self, name: str):  # add, state_dict, channel, ...: the wrapped Child's
        return getattr(self.child, name)


class AdaptiveParent:
    """A parent's end of adaptive clipping, around its Parent link: after the parameters it
    broadcasts the clip norm C its keeper holds (the NoisySum of the tier that adds the noise, or an
    edge's ClipRelay); after the updates it receives the children's Σ(b_c − ½) and hands it to the
    keeper (a NoisySum noises it and moves C when it aggregates; a relay passes it up)."""

    def __init__(self, parent, keeper: ClipKeeper) -> None:
        self.parent, self.keeper = parent, keeper
        self.used = keeper.clip  # C of the last aggregation (for its row)

    def send(self, params: np.ndarray, receivers: int | None = None, rng: np.random.Generator | None = None) -> None:
        self.parent.send(params, receivers, rng)
        self.used = self.keeper.clip
        send_clip(self.parent.channel, self.used, receivers)

    def receive(self) -> np.ndarray:
        total = self.parent.receive()
        self.keeper.bits = receive_count(self.parent.channel)
        return total

    def report(self) -> dict:
        """The row's account: the clip norm C the devices clipped to (and SecAgg's, if it is inside)."""
        return {**getattr(self.parent, "report", dict)(), "clip": self.used}

    def __getattr__(self, name: str):  # state_dict, channel, decode_s, ...: the wrapped Parent's
        return getattr(self.parent, name)
