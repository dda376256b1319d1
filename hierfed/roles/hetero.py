"""Heterogeneous, unreliable clients in the role loops: which clients train how many steps from
which model each edge round, and what they contribute (docs/heterogeneity.md).

`ClientSchedule` is computed identically on an edge (or a flat cloud) and on each of its devices,
from the run config, the topology's device behaviour and the clients' FLOPs per local step (the
cloud computes those once, `client_step_flops`, and sends them in the start-up Plan). It turns the
pure plans of hierfed.sim.schedule into work for the loops:

    device, every edge round s:   for job in jobs(t, s, mine): train job.steps from the received model
                                  for key, scale in due(t, s, mine): contribute scale x that update
    edge, every edge round s:     row(t, s) -> what happened, for its metrics row

With no heterogeneity configured every sampled client trains tau1 steps and contributes at once,
exactly as before. Every client that contributes nothing still leaves its rank in the collective
(weight 0), so a round always completes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hierfed.comm.codecs import parse_codec
from hierfed.roles.protocol import local_steps
from hierfed.roles.work import StepCost
from hierfed.seeding import derive_seed
from hierfed.sim.behaviour import drops_out, is_available
from hierfed.sim.clock import Rates
from hierfed.sim.schedule import BufferRound, SyncRound, Timing, plan_fedbuff, plan_sync


def client_step_flops(cfg, task, model, tokenizer, num_clients: int) -> np.ndarray | None:
    """FLOPs of one local step of every client (index: client id), as its device prices it
    (hierfed.roles.work.StepCost on the client's tokenised shard; `model` may be a meta skeleton);
    None when no timing policy is on."""
    if not cfg.schedule.timed:
        return None
    from hierfed.data import partition
    from hierfed.training import tokenize

    shards = partition(task.train, num_clients, cfg.data.partition, alpha=cfg.data.alpha, seed=cfg.data.seed)
    cost = StepCost(model, cfg)
    out = np.zeros(num_clients, dtype=np.float64)
    for c in range(num_clients):
        data = tokenize(tokenizer, [task.train[i] for i in shards[c]], task.kind, cfg.model.max_length)
        out[c] = cost.work(c, data, 1, 0.0)["flops"]
    return out


@dataclass(frozen=True)
class Job:
    """A client's local training this edge round: `steps` from the model just received."""

    client: int
    steps: int
    seed: int
    key: tuple[int, int]  # (client, attempt): names the update until it is contributed
    now: bool  # contributed this edge round (else held until `due` names it)
    scale: float = 1.0


class ClientSchedule:
    """What the clients of edge `edge` (None: every client of a flat topology) do each edge round."""

    def __init__(self, cfg, placement, step_flops: np.ndarray | None, edge: int | None, dim: int) -> None:
        self.cfg, self.s = cfg, cfg.schedule
        self.tau1 = local_steps(cfg, placement.flat)  # a client's full work per edge round (flat: schedule.flat_local_steps)
        devices = placement.devices if edge is None else placement.edges[edge].devices
        self.behaviour = {c: d.behaviour for d in devices for c in d.clients}
        self.reliable = all(d.behaviour.reliable for d in devices)
        self.timed = step_flops is not None
        self.weights: dict[int, float] = {}
        self.timing: dict[int, Timing] = {}
        if step_flops is not None:  # timed
            rates = Rates.from_config(cfg.sim)
            c = cfg.compression
            down, up = parse_codec(c.cloud_down if edge is None else c.edge_down), parse_codec(c.device_up)
            down_b = 4 * dim if down.is_identity else down.encoded_size(dim)
            up_b = 4 * (dim + 1) if up.is_identity else up.encoded_size(dim) + 16
            for d in devices:
                rate = rates.device_flops_per_s(d)
                for cl in d.clients:
                    self.timing[cl] = Timing(d.link.seconds(down_b), float(step_flops[cl]) / rate, d.link.seconds(up_b))
        self._sync: dict[tuple[int, int], SyncRound] = {}
        self._buf: dict[int, BufferRound] = {}

    @property
    def plain(self) -> bool:
        """Nothing to decide: every sampled client trains tau1 steps (today's loop)."""
        return self.reliable and not self.timed

    def sync(self, t: int, s: int, sampled: set[int]) -> SyncRound:
        if (t, s) not in self._sync:
            seed, b = self.cfg.seed, self.behaviour
            mine = [c for c in sampled if c in b]
            self._sync = {(t, s): plan_sync(
                mine, self.timing or {c: Timing(0.0, 0.0, 0.0) for c in mine},
                lambda c: is_available(b[c], seed, t, s, c), lambda c: drops_out(b[c], seed, t, s, c),
                self.tau1, self.s.straggler, self.s.deadline, self.s.deadline_quantile, self.s.over_selection)}
        return self._sync[(t, s)]

    def fedbuff(self, t: int, sampled: set[int]) -> BufferRound:
        if t not in self._buf:
            seed, b = self.cfg.seed, self.behaviour
            reachable = [c for c in sorted(sampled) if c in b and is_available(b[c], seed, t, 0, c)]
            k = self.s.buffer_k or len(reachable)
            # attempt a of a client draws its dropout as edge round "a + 1" of the cloud round
            self._buf = {t: plan_fedbuff(reachable, self.timing, lambda c, a: drops_out(b[c], seed, t, a + 1, c),
                                         self.tau1, k, self.s.tau2, self.s.staleness_exponent)}
        return self._buf[t]

    def jobs(self, t: int, s: int, mine: list[int], sampled: set[int], steps: int) -> list[Job]:
        """This rank's training in edge round s (`mine`: its sampled clients; `sampled`: its
        parent's; `steps`: a full round's local steps)."""
        seed = self.cfg.seed
        if self.plain:
            return [Job(c, steps, derive_seed(seed, t, s, c), (c, 0), True) for c in mine]
        if self.s.edge_mode == "fedbuff":
            buf, out = self.fedbuff(t, sampled), []
            seen: dict[int, int] = {}
            arriving = {(a.client, a.attempt): a.weight for a in (buf.steps[s - 1] if s <= len(buf.steps) else [])}
            for c, attempt in buf.trains.get(s - 1, []):
                if c not in mine:
                    continue
                n = seen[c] = seen.get(c, -1) + 1  # a client's n-th start from this version: its own seed
                out.append(Job(c, steps, derive_seed(seed, t, s, c, *((n,) if n else ())), (c, attempt),
                               (c, attempt) in arriving, arriving.get((c, attempt), 1.0)))
            return out
        plan = self.sync(t, s, sampled)
        return [Job(c, o.steps, derive_seed(seed, t, s, c), (c, 0), True)
                for c in mine if (o := plan.outcomes[c]).steps > 0]

    def due(self, t: int, s: int, mine: list[int], sampled: set[int], trained_now: set[tuple[int, int]]) -> list[tuple[tuple[int, int], float]]:
        """Updates trained in earlier edge rounds that arrive in edge round s (FedBuff), with their
        staleness weights (`trained_now`: those of this round's jobs, already contributed)."""
        if self.s.edge_mode != "fedbuff" or self.plain:
            return []
        plan = self.fedbuff(t, sampled)
        mine_set = set(mine)
        steps = plan.steps[s - 1] if s <= len(plan.steps) else []
        return [((a.client, a.attempt), a.weight) for a in steps if a.client in mine_set and (a.client, a.attempt) not in trained_now]

    def unreachable(self, t: int, s: int, sampled: set[int]) -> int:
        """Sampled clients of this schedule that cannot be reached in edge round s (the edge's
        broadcast does not count them)."""
        if self.plain:
            return 0
        if self.s.edge_mode == "fedbuff":
            seed, b = self.cfg.seed, self.behaviour
            return sum(not is_available(b[c], seed, t, 0, c) for c in sampled if c in b)
        return self.sync(t, s, sampled).count("unavailable")

    def row(self, t: int, s: int, sampled: set[int]) -> dict[str, Any]:
        """The edge row's account of edge round s: sampled, available, dropped, late, ..."""
        if self.plain:
            return {}
        if self.s.edge_mode == "fedbuff":
            return self.fedbuff(t, sampled).fields(s)
        out = self.sync(t, s, sampled).fields()
        if not self.timed:
            out.pop("span_s")
            out.pop("deadline_s")
        return out
