"""Simulated wall clock: how long each cloud round would take on the cluster the topology describes.

A run counts every byte per link (the ledger) and, per trained client, its local steps and their
FLOPs (hierfed.sim.flops) and measured compute seconds; the topology gives a `LinkModel` (latency +
bytes / bandwidth) per link and a compute rate per device (`tflops`, or `speed` × the run's
`sim.reference_tflops`). Replaying a run's metrics rows through those models gives per-round
durations that do not depend on how many ranks shared the cores of the machine that ran it. The
model (docs/launch.md, "Simulated clock"):

    client c in an edge round:  down_c + compute_c + up_c
        compute_c = its FLOPs / its device's rate      (sim.compute: model, the default)
                  = its measured seconds / its speed   (sim.compute: measured, for calibration)
                  + a split client's upper-stage FLOPs / its edge's rate
        down_c    = its link carrying one copy of the edge's broadcast (the edge row's downlink
                    bytes over the clients that received it)
        up_c      = its link carrying its share of its device rank's uplink bytes
    edge round (edge e):  the slowest client of the round + e's aggregation; a row with `span_s`
                          (deadlines, FedBuff: hierfed.sim.schedule) takes that span instead
                          of its slowest client: waiting for a deadline or for K arrivals
    cloud round:          max over edges e of [cloud->e + Σ e's edge rounds + e->cloud] + the cloud's aggregation
        cloud<->e         = e's edge-cloud link carrying the round's edge-cloud bytes / edges taking part
    flat cloud round:     the slowest client (over the device-cloud links) + the cloud's aggregation

Every virtual client is a device of its rank's class with its own link: a rank that simulates 25
phones simulates 25 phones working side by side (the rank trains them one after another; the
simulated clock does not). Aggregation is priced as 2·n·dim FLOPs at the aggregator's rate in the
model mode, and as measured in the measured mode. A link that carried no bytes costs nothing (no
latency). Round 0 (evaluation of the untrained model) takes no simulated time. Pure: no MPI.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from hierfed.topology import DeviceSpec, LinkModel, Placement


@dataclass(frozen=True)
class Rates:
    """How compute is priced: `model` (FLOPs / rate) or `measured` (seconds / speed), and the rates."""

    compute: str = "model"
    reference_tflops: float = 0.5  # defaults: hierfed.config.SimConfig's
    edge_tflops: float = 5.0
    cloud_tflops: float = 50.0

    @classmethod
    def from_config(cls, sim: Any) -> Rates:
        """From a run config's `sim` section (hierfed.config.SimConfig)."""
        return cls(sim.compute, sim.reference_tflops, sim.edge_tflops, sim.cloud_tflops)

    def device_flops_per_s(self, d: DeviceSpec) -> float:
        return 1e12 * (d.tflops if d.tflops is not None else d.speed * self.reference_tflops)

    def device_speed(self, d: DeviceSpec) -> float:
        """Relative speed (1.0 = the reference device) for the measured mode."""
        return d.tflops / self.reference_tflops if d.tflops is not None else d.speed


@dataclass(frozen=True)
class RoundTime:
    """One cloud round on the modelled cluster: total and its parts along the critical path."""

    round: int
    seconds: float  # simulated duration of the round
    compute: float  # compute on the critical path (devices, split edges, aggregation)
    communication: float  # link time on the critical path
    clock: float  # simulated time at the end of the round (sum of the rounds so far)


def link_seconds(link: LinkModel, nbytes: float) -> float:
    """A transfer over `link`; nothing sent costs nothing (no latency)."""
    return link.seconds(int(round(nbytes))) if nbytes > 0 else 0.0


def _bytes(row: dict[str, Any], link: str) -> tuple[float, float]:
    d = (row.get("bytes") or {}).get(link) or {}
    return float(d.get("up", 0)), float(d.get("down", 0))


class _Clock:
    def __init__(self, placement: Placement, rates: Rates) -> None:
        self.p, self.rates = placement, rates
        self.device_of = {c: d for d in placement.devices for c in (d.clients if len(d.clients) < 4096 else ())}
        self.edge_of_client = {c: e for e in placement.edges for c in e.clients}

    def device(self, client: int) -> DeviceSpec:
        d = self.device_of.get(client)
        if d is None:  # a rank with many virtual clients: find it by range
            d = next(d for d in self.p.devices if client in d.clients)
        return d

    def aggregate_seconds(self, row: dict[str, Any], dim: int, children: int, tflops: float) -> float:
        if self.rates.compute == "measured":
            return float((row.get("seconds") or {}).get("aggregate", 0.0))
        return 2.0 * children * dim / (1e12 * tflops)

    def step(self, row: dict[str, Any], link_name: str, edge_tflops: float | None) -> tuple[float, float, float]:
        """(time, compute, communication) of the slowest client of one aggregation step."""
        work = row.get("work")
        up, down = _bytes(row, link_name)
        span = row.get("span_s")  # planned from the model clock (hierfed.sim.schedule): waiting for a deadline included
        if not work:
            return (float(span), 0.0, 0.0) if span else (0.0, 0.0, 0.0)
        receivers = max(1, int(row.get("receivers") or len(work)))
        best = (0.0, 0.0, 0.0)
        for w in work:
            if w.get("edge") is not None:  # the edge's own client (train_locally): no link
                compute = self._compute(w, None, edge_tflops)
                down_s = up_s = 0.0
            else:
                d = self.device(w["client"])
                compute = self._compute(w, d, edge_tflops)
                down_s = link_seconds(d.link, down / receivers)
                up_s = link_seconds(d.link, float(w.get("up", 0.0)))
            total = down_s + compute + up_s
            if total > best[0]:
                best = (total, compute, down_s + up_s)
        if span is not None:
            return float(span), best[1], best[2]
        return best

    def _compute(self, w: dict[str, Any], d: DeviceSpec | None, edge_tflops: float | None) -> float:
        edge_rate = 1e12 * (edge_tflops if edge_tflops is not None else self.rates.edge_tflops)
        upper = float(w.get("edge_flops", 0.0)) / edge_rate  # a split client's blocks on its edge
        if self.rates.compute == "measured":
            speed = 1.0 if d is None else self.rates.device_speed(d)
            return float(w.get("seconds", 0.0)) / speed
        rate = edge_rate if d is None else self.rates.device_flops_per_s(d)
        return float(w.get("flops", 0.0)) / rate + upper


def round_times(rows: list[dict[str, Any]], placement: Placement, rates: Rates | None = None, dim: int = 0) -> list[RoundTime]:
    """Simulated time of every cloud round in a run's metrics rows (metrics.jsonl), in order.
    `dim`: the length of the vector that travels (aggregation cost in the model mode)."""
    clock_model = _Clock(placement, rates or Rates())
    cloud = sorted((r for r in rows if r.get("tier") == "cloud"), key=lambda r: r["round"])
    edge_rows: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("tier") == "edge":
            edge_rows[r["round"]].append(r)
    out: list[RoundTime] = []
    clock = 0.0
    cloud_tflops = clock_model.rates.cloud_tflops
    for row in cloud:
        t = row["round"]
        if t == 0:
            out.append(RoundTime(0, 0.0, 0.0, 0.0, 0.0))
            continue
        if placement.flat:
            secs, compute, comm = clock_model.step(row, "device-cloud", None)
            agg = clock_model.aggregate_seconds(row, dim, len(row.get("work") or ()), cloud_tflops)
            secs, compute = secs + agg, compute + agg
        else:
            secs, compute, comm = _hierarchical(clock_model, row, edge_rows.get(t, []), dim)
        clock += secs
        out.append(RoundTime(t, secs, compute, comm, clock))
    return out


def _hierarchical(c: _Clock, row: dict[str, Any], erows: list[dict[str, Any]], dim: int) -> tuple[float, float, float]:
    by_edge: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in erows:
        by_edge[r.get("edge", "")].append(r)
    up, down = _bytes(row, "edge-cloud")
    taking_part = [e for e in c.p.edges if by_edge.get(e.name)] or list(c.p.edges)
    share_up, share_down = up / len(taking_part), down / len(taking_part)
    best = (0.0, 0.0, 0.0)  # the critical edge: (total, compute, communication)
    for e in taking_part:
        tflops = e.tflops if e.tflops is not None else c.rates.edge_tflops
        total = compute = comm = 0.0
        for r in sorted(by_edge.get(e.name, []), key=lambda r: r.get("edge_round") or 0):
            s, w, m = c.step(r, "device-edge", tflops)
            agg = c.aggregate_seconds(r, dim, len(r.get("work") or ()), tflops)
            total, compute, comm = total + s + agg, compute + w + agg, comm + m
        links = link_seconds(e.link, share_down) + link_seconds(e.link, share_up)
        total, comm = total + links, comm + links
        if total > best[0]:
            best = (total, compute, comm)
    # the cloud row's measured aggregate = the cloud's own + the slowest edge's; the model prices the cloud's own
    if c.rates.compute == "measured":
        edge_agg = max((sum(float((r.get("seconds") or {}).get("aggregate", 0.0)) for r in by_edge[e.name]) for e in taking_part), default=0.0)
        cloud_agg = max(0.0, float((row.get("seconds") or {}).get("aggregate", 0.0)) - edge_agg)
    else:
        cloud_agg = 2.0 * len(taking_part) * dim / (1e12 * c.rates.cloud_tflops)
    return best[0] + cloud_agg, best[1] + cloud_agg, best[2]
