"""What each client of an edge does in an edge round, decided from the model clock: synchronous
rounds with a deadline (straggler policies) and asynchronous buffered edges (FedBuff).

Both plans are pure functions of the clients' modelled times (`Timing`: download, one local step
at the device class's rate, upload) and the behaviour draws (hierfed.sim.behaviour), so the edge
and every device of it compute the same plan with no message, and the run is deterministic and
resumable. docs/heterogeneity.md has the rules; in short:

Synchronous (`plan_sync`): a client's full work arrives at down + tau1 x step + up. The cut-off
is the smallest of `deadline`, the time by which the fastest `quantile` of the reachable clients
have arrived, and (over-selection) the time of the ceil(n / (1 + o))-th arrival. `wait` has no
cut-off; `drop` discards what has not arrived by it; `partial` takes the steps a client finished
by it (floor((cut - down - up) / step), fewer than tau1). A client that dropped out never arrives.
The edge round lasts until the cut-off when anyone reachable failed to deliver full work, else
until the last arrival. FedNova's normalisation of partial work (schedule.normalise: fednova) is
the FedNova client algorithm (hierfed.strategy.client): each client sends its delta over the steps
it took, with its step count, and its parent normalises; the plan only says how many steps.

FedBuff (`plan_fedbuff`, Nguyen et al. 2022): every reachable client trains from the edge's
current model, uploads, and starts again from the model the edge holds then; the edge applies the
buffer every K arrivals (one edge round), each update weighted by g(s) = (1 + s)^-a, s its
staleness (edge updates since the model it trained from). Arrivals at the same instant are taken
in client order and their clients restart only after all of them were applied, so equal clocks
give a synchronous round exactly. The plan lists which (client, attempt) trains from which model
version and lands in which buffer; in-flight work at the end of the cloud round is discarded.
Pure: no MPI, no torch.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

INF = math.inf


@dataclass(frozen=True)
class Timing:
    """One client's modelled times (simulated seconds): download, one local step, upload."""

    down: float
    step: float
    up: float

    def finish(self, steps: int) -> float:
        return self.down + steps * self.step + self.up

    def steps_by(self, cut: float, most: int) -> int:
        """Local steps that fit before `cut`, counting the transfers (at most `most`, at least 0)."""
        if self.step <= 0:
            return most if self.finish(0) <= cut else 0
        k = max(0, min(most, math.floor((cut - self.down - self.up) / self.step)))
        while k > 0 and self.finish(k) > cut:  # floating-point rounding at the boundary
            k -= 1
        return k


@dataclass(frozen=True)
class Outcome:
    """What a client did in an edge round. status: ok | partial | late | dropped | unavailable."""

    client: int
    status: str
    steps: int  # local steps it trains and contributes (0: contributes nothing)
    finish: float  # when its update arrives (inf: never)


@dataclass(frozen=True)
class SyncRound:
    outcomes: dict[int, Outcome]
    cut: float | None  # the cut-off applied (None: wait for every arrival)
    span: float  # the edge round's simulated duration

    def count(self, *status: str) -> int:
        return sum(o.status in status for o in self.outcomes.values())

    def fields(self) -> dict:
        """The edge row's account of the round (metrics.jsonl)."""
        return {"sampled": len(self.outcomes), "available": len(self.outcomes) - self.count("unavailable"),
                "dropped": self.count("dropped"), "late": self.count("late", "partial"), "partial": self.count("partial"),
                "deadline_s": self.cut, "span_s": self.span}


def _kth(times: list[float], k: int) -> float:
    """The k-th smallest finite time (k >= 1), or the largest finite one when fewer arrive."""
    finite = sorted(x for x in times if x < INF)
    return finite[min(k, len(finite)) - 1] if finite else 0.0


def plan_sync(clients: list[int], timing: dict[int, Timing], reachable: Callable[[int], bool], vanishes: Callable[[int], bool],
              tau1: int, policy: str = "wait", deadline: float | None = None, quantile: float | None = None,
              over_selection: float = 0.0) -> SyncRound:
    """The plan of one synchronous edge round for `clients` (the edge's sampled clients)."""
    out: dict[int, Outcome] = {}
    full: dict[int, float] = {}
    for c in sorted(clients):
        if not reachable(c):
            out[c] = Outcome(c, "unavailable", 0, INF)
        elif vanishes(c):
            out[c] = Outcome(c, "dropped", 0, INF)
            full[c] = INF
        else:
            full[c] = timing[c].finish(tau1)
    cuts = [] if deadline is None else [deadline]
    if quantile is not None and full:
        cuts.append(_kth(list(full.values()), math.ceil(quantile * len(full) - 1e-9)))
    if over_selection > 0 and full:
        cuts.append(_kth(list(full.values()), math.ceil(len(full) / (1.0 + over_selection) - 1e-9)))
    cut = min(cuts) if cuts and policy != "wait" else None
    for c, f in full.items():
        if f == INF:
            continue
        if cut is None or f <= cut:
            out[c] = Outcome(c, "ok", tau1, f)
        elif policy == "partial" and (k := timing[c].steps_by(cut, tau1 - 1)) > 0:
            out[c] = Outcome(c, "partial", k, timing[c].finish(k))
        else:
            out[c] = Outcome(c, "late", 0, INF)
    delivered = [o for o in out.values() if o.steps > 0]
    failed = any(o.status in ("dropped", "late", "partial") for o in out.values())
    span = cut if (cut is not None and failed) else max((o.finish for o in delivered), default=0.0)
    return SyncRound(out, cut, span)


@dataclass(frozen=True)
class Arrival:
    """An update that reaches the edge's buffer."""

    client: int
    attempt: int  # the client's attempts in this cloud round, from 0
    version: int  # the edge model it trained from (0: the one the cloud sent)
    staleness: int  # edge updates between that model and this arrival
    time: float
    weight: float  # the staleness weight g(s)


@dataclass
class BufferRound:
    """One cloud round of a FedBuff edge: `steps[j]` are the arrivals applied as edge update j+1
    (at `times[j]`); `trains[v]`: the (client, attempt) that train from version v and arrive."""

    steps: list[list[Arrival]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    trains: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    dropped: int = 0  # attempts that vanished before arriving
    discarded: int = 0  # attempts in flight when the cloud round ended

    def fields(self, j: int) -> dict:
        """The edge row of edge update j (1-based)."""
        arrivals = self.steps[j - 1] if j <= len(self.steps) else []
        start = self.times[j - 2] if j >= 2 else 0.0
        end = self.times[j - 1] if j <= len(self.times) else start
        return {"arrivals": len(arrivals), "staleness": [a.staleness for a in arrivals], "span_s": end - start,
                **({"dropped": self.dropped, "discarded": self.discarded} if j == len(self.times) else {})}


def staleness_weight(s: int, exponent: float) -> float:
    """FedBuff's polynomial staleness weight g(s) = (1 + s)^-a (a = 0.5: 1/sqrt(1 + s))."""
    return (1.0 + s) ** -exponent


def plan_fedbuff(clients: list[int], timing: dict[int, Timing], vanishes: Callable[[int, int], bool], tau1: int, k: int,
                 updates: int, exponent: float = 0.5, max_events: int | None = None) -> BufferRound:
    """The arrivals of one cloud round at a FedBuff edge: `clients` (reachable this cloud round)
    train continuously from time 0; every `k` arrivals make an edge update, `updates` of them.
    `vanishes(client, attempt)`: that attempt drops out (it never arrives; the client is back
    when it would have arrived)."""
    plan = BufferRound()
    if not clients or updates < 1:
        return plan
    k = min(k, len(clients))
    heap = [(timing[c].finish(tau1), c, 0, 0) for c in sorted(clients)]
    heapq.heapify(heap)
    version, buffer, now = 0, [], 0.0
    limit = max_events if max_events is not None else 1000 * updates * len(clients)
    events = 0
    pending: list[tuple[int, int, int]] = []  # (client, attempt, version) that arrive in a buffer
    while heap and version < updates and events < limit:
        now = heap[0][0]
        group = []
        while heap and heap[0][0] == now:
            group.append(heapq.heappop(heap))
        for _, c, attempt, v in sorted(group, key=lambda e: e[1]):
            events += 1
            if version >= updates:
                break
            if vanishes(c, attempt):
                plan.dropped += 1
                continue
            s = version - v
            buffer.append(Arrival(c, attempt, v, s, now, staleness_weight(s, exponent)))
            pending.append((c, attempt, v))
            if len(buffer) == k:
                version += 1
                plan.steps.append(buffer)
                plan.times.append(now)
                buffer = []
        for _, c, attempt, _v in group:  # every client of the group restarts from the newest model
            heapq.heappush(heap, (now + timing[c].finish(tau1), c, attempt + 1, version))
    plan.discarded = len(buffer) + sum(1 for e in heap if e[3] < updates)
    landed = {(a.client, a.attempt) for step in plan.steps for a in step}
    for c, attempt, v in pending:
        if (c, attempt) in landed:
            plan.trains.setdefault(v, []).append((c, attempt))
    while len(plan.times) < updates:  # nothing more arrives (every attempt drops out): empty updates
        plan.steps.append([])
        plan.times.append(plan.times[-1] if plan.times else now)
    return plan
