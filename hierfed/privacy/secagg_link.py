"""Secure aggregation between an edge and its devices, as wrappers around the edge's Parent and the
devices' Child (hierfed.comm.links): the strategy above and the channel below do not change.

Per edge round (one aggregation), over the edge's communicator, every device rank taking part
whether or not it has sampled clients (a rank's virtual clients each run their own protocol):
  devices --adverts--> edge --all adverts--> devices --sealed shares--> edge --routed--> devices
  devices: Σ_c masked y_c (uint32, or uint16 for int8/int4 codes whose sum fits) --Reduce(SUM), wrapping--> edge
  devices --who was sent--> edge --survivors/dropped--> devices --revealed shares--> edge: unmask
Every message is counted in the ledger on the device-edge link: the ring elements as payload (4 or 2
bytes a word, as they travel; their float32 size as raw), keys and shares as kind "secagg".

Clients drop after masking in two ways: the behaviour model's `dropout` (hierfed.sim.behaviour: a
sampled, reachable client that vanishes mid-round has advertised its keys and shared its seeds, then
never sends its masked update nor reveals anything), and the `HIERFED_SECAGG_DROP=ROUND:CLIENT,...`
test hook (those clients trained and masked, and drop in that cloud round). Either way the edge
removes their masks from the Shamir shares, or fails that edge round below t survivors.

The encoding is fixed point in Z_2^32 (identity/fp32 uplinks) or the int8/int4 codec's codes on a
shared grid (hierfed.privacy.ring.SharedGrid), in Z_2^16 when the edge's fan-out allows; with error feedback each client's residual (what its codes did
not carry) stays on its device, unmasked, and is checkpointed with the device's state.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI

from hierfed.comm.channel import Channel, at_parent, bcast_object, wait
from hierfed.privacy.ring import FixedPoint, SharedGrid
from hierfed.privacy.secagg import Client, SecAggError, Server, threshold

_KIND = "secagg"


def _size(obj: Any) -> int:
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _up(ch: Channel, obj: Any) -> list[Any] | None:
    """A protocol message from every child to the parent, counted at the child."""
    if not ch.is_parent:
        ch.ledger.record(ch.link, "up", _size(obj) + 8, kind=_KIND, raw=0)
    return ch.gather_obj(obj)


def _collect(ch: Channel) -> list[Any]:
    """The parent's side of `_up`: every child's message, in child order."""
    return at_parent(_up(ch, None))


def _down(ch: Channel, obj: Any, receivers: int) -> Any:
    """The same protocol message to every child, counted at the parent once per receiving client."""
    if ch.is_parent:
        ch.ledger.record(ch.link, "down", (_size(obj) + 8) * receivers, kind=_KIND, raw=0)
    return bcast_object(ch.comm, obj, ch.is_parent, ch.poll)


def _scatter(ch: Channel, objs: list[Any] | None) -> Any:
    """One protocol message per child (the parent's `objs`, in child order), counted at the parent."""
    if ch.is_parent:
        assert objs is not None  # the parent scatters its objs; children pass None
        blobs = [b""] + [pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL) for o in objs]
        sizes = np.array([len(b) for b in blobs], dtype=np.int64)
        ch.ledger.record(ch.link, "down", int(sizes.sum()) + 8 * len(objs), kind=_KIND, raw=0)
        mine = np.zeros(1, dtype=np.int64)
        wait(ch.comm.Iscatter(sizes, mine, root=0), ch.poll)
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        wait(ch.comm.Iscatterv([b"".join(blobs), sizes, displs, MPI.BYTE], bytearray(0), root=0), ch.poll)
        return None
    mine = np.zeros(1, dtype=np.int64)
    wait(ch.comm.Iscatter(None, mine, root=0), ch.poll)
    buf = bytearray(int(mine[0]))
    wait(ch.comm.Iscatterv(None, buf, root=0), ch.poll)
    return pickle.loads(buf)


def forced_drops() -> dict[int, set[int]]:
    """The test hook HIERFED_SECAGG_DROP="ROUND:CLIENT,...": cloud round -> clients that drop after masking."""
    out: dict[int, set[int]] = {}
    for item in os.environ.get("HIERFED_SECAGG_DROP", "").split(","):
        if item.strip():
            t, c = item.split(":")
            out.setdefault(int(t), set()).add(int(c))
    return out


class SecAggChild:
    """A device's uplink under secure aggregation: each client's [w·Δ, w] is encoded in the ring
    (Z_2^32, or Z_2^16 for codes whose sum fits) and masked; only the rank's masked sum travels."""

    def __init__(self, child, fixed: FixedPoint | SharedGrid, fraction: float, edge: int | None, start_round: int, edge_rounds: int,
                 error_feedback: bool = False, dropouts: Callable[[int, int], set[int]] | None = None) -> None:
        self.child, self.fixed, self.fraction, self.edge = child, fixed, fraction, edge
        self._count = (start_round - 1) * edge_rounds  # aggregations so far (both ends count alike)
        self.edge_rounds = edge_rounds
        self._queued: dict[int, tuple[np.ndarray, float, int, np.ndarray | None]] = {}
        self._drop = forced_drops()
        self._dropouts = dropouts  # (cloud round, edge round) -> this rank's clients the behaviour model drops mid-round
        # error feedback on a shared grid: per client, the part of w·Δ its codes did not carry (float64, unmasked)
        self.residual: dict[int, np.ndarray] | None = {} if (error_feedback and isinstance(fixed, SharedGrid)) else None

    def add(self, sender: int, weight: float, delta: np.ndarray, rng: np.random.Generator | None = None) -> None:
        weighted = np.multiply(delta, weight, dtype=np.float64)
        if isinstance(self.fixed, FixedPoint):
            x, saturated = self.fixed.encode(weighted, weight)
            self._queued[sender] = x, weight, saturated, None
            return
        if rng is None:
            raise ValueError("secure aggregation of int8 codes rounds stochastically: add() needs an rng")
        if self.residual is not None and sender in self.residual:
            weighted += self.residual[sender]
        x, saturated, carried = self.fixed.encode(weighted, weight, rng)
        if self.residual is not None:
            self.residual[sender] = weighted - carried
        self._queued[sender] = x, weight, saturated, weighted

    def send(self) -> float:
        ch = self.child.channel
        self._count += 1
        tag = f"edge{self.edge}/agg{self._count}".encode()
        t_round, s_round = (self._count - 1) // self.edge_rounds + 1, (self._count - 1) % self.edge_rounds + 1
        vanished = set(self._dropouts(t_round, s_round)) - set(self._queued) if self._dropouts else set()
        clients = {c: Client(c, tag) for c in sorted(set(self._queued) | vanished)}  # the vanished set up keys, then left
        _up(ch, {c: cl.advertise() for c, cl in clients.items()})
        adverts = _down(ch, None, 0)
        t = threshold(len(adverts), self.fraction) if adverts else 0
        sealed, commits = {}, {}
        for c, cl in clients.items():
            sealed[c], commits[c] = cl.share(adverts, t)
        _up(ch, (sealed, commits))
        routed, members = _scatter(ch, None)
        for c, cl in clients.items():
            cl.receive(routed.get(c, {}))
        acc = np.zeros(self.fixed_size, dtype=self.fixed.dtype)
        drop = self._drop.get(t_round, set()) | vanished
        sent = [c for c in clients if c not in drop]
        if self.residual is not None:  # a client that dropped after encoding delivered nothing: all of it is owed
            for c in set(self._queued) & drop:
                owed = self._queued[c][3]
                assert owed is not None  # residuals exist only on a shared grid, whose add() keeps w·Δ
                self.residual[c] = owed
        for c in sent:
            acc += clients[c].mask(self._queued[c][0], members)
        ch.reduce_sum(acc, senders=len(sent), raw=4 * (self.child.dim + 1))  # raw: [w·Δ, w] as float32
        _up(ch, (sent, sum(self._queued[c][2] for c in sent)))
        survivors, dropped = _down(ch, None, 0)
        _up(ch, {c: clients[c].reveal(survivors, dropped) for c in sent})
        weight = float(sum(self._queued[c][1] for c in sent))
        self._queued = {}
        return weight

    @property
    def fixed_size(self) -> int:
        return self.fixed.words(self.child.dim)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The clients' error-feedback residuals (shared grid), else the wrapped Child's state."""
        if self.residual is None:
            return self.child.state_dict()
        return {f"residual/{c}": r.copy() for c, r in self.residual.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if self.residual is None:
            self.child.load_state_dict(state)
            return
        self.residual = {int(k.split("/", 1)[1]): np.asarray(v, dtype=np.float64).copy() for k, v in state.items()}

    def __getattr__(self, name: str):  # receive, feedback, state_dict, ...: the wrapped Child's
        return getattr(self.child, name)


class SecAggParent:
    """An edge's downlink/uplink under secure aggregation: receives only the unmasked sum of its
    clients' fixed-point updates; a failed aggregation (too few survivors or shares, a corrupt
    share) contributes nothing and is reported in the edge's row."""

    def __init__(self, parent, fixed: FixedPoint | SharedGrid, fraction: float, edge: int | None, start_round: int, edge_rounds: int) -> None:
        self.parent, self.fixed, self.fraction, self.edge = parent, fixed, fraction, edge
        self._count = (start_round - 1) * edge_rounds
        self.decode_s = 0.0
        self.secagg_s = 0.0  # the last aggregation's protocol time at the edge (`row_seconds`)
        self.last: dict[str, Any] = {}

    def send(self, params: np.ndarray, receivers: int | None = None, rng: np.random.Generator | None = None) -> None:
        self.parent.send(params, receivers, rng)

    def receive(self) -> np.ndarray:
        ch = self.parent.channel
        self._count += 1
        server = Server(f"edge{self.edge}/agg{self._count}".encode(), self.fraction)
        adverts = {c: a for part in _collect(ch) for c, a in part.items()}
        begun = time.perf_counter()  # every advert is in: the last client has trained
        n = len(adverts)
        _down(ch, server.collect_adverts(adverts), n)
        parts = _collect(ch)
        sealed = {c: s for part, _ in parts for c, s in part.items()}
        commits = {c: h for _, part in parts for c, h in part.items()}
        routed = server.route(sealed, commits)
        members = server.members
        _scatter(ch, [({c: routed[c] for c in part}, members) for part in self._owners(adverts, parts)])
        total = np.zeros(self.fixed.words(self.parent.dim), dtype=self.fixed.dtype)
        ch.reduce_sum(total)
        sent = _collect(ch)
        survivors = sorted(c for part, _ in sent for c in part)
        dropped = [c for c in members if c not in survivors]
        _down(ch, (survivors, dropped), len(survivors))
        reveals = {c: r for part in _collect(ch) for c, r in part.items()}
        started = time.perf_counter()
        self.last = {"members": len(members), "survivors": len(survivors), "t": server.t, "failed": None, "ring": self.fixed.ring,
                     "saturated": sum(n for _, n in sent)}  # coordinates beyond ±secagg_bound (clipped there)
        out = np.zeros(self.parent.dim + 1, dtype=np.float64)
        if members:
            try:
                out = self.fixed.decode(server.unmask(total, survivors, reveals))
            except SecAggError as e:
                self.last["failed"] = str(e)
        self.decode_s = time.perf_counter() - started
        self.secagg_s = time.perf_counter() - begun
        return out

    @staticmethod
    def _owners(adverts: dict, parts: list) -> list[list[int]]:
        """Per child (in order): the clients it hosts (those whose shares it sent)."""
        return [sorted(sealed) for sealed, _ in parts]

    def report(self) -> dict[str, Any]:
        """The last aggregation's SecAgg outcome, for the edge's row."""
        return {"secagg": dict(self.last)}

    def row_seconds(self) -> dict[str, float]:
        """The last aggregation's protocol time at the edge, for the edge row's `seconds`: from the
        moment every client's advert is in (so the devices' training is not in it) to the unmasked
        sum — relaying the adverts, collecting and routing the sealed shares, waiting for the masked
        Reduce (the devices' masking is in that wait), survivors, reveals and unmasking. The
        unmasking is also in `aggregate` (as decode time)."""
        return {"secagg": self.secagg_s}

    def __getattr__(self, name: str):  # state_dict, channel, down, ...: the wrapped Parent's
        return getattr(self.parent, name)
