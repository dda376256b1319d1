"""Simulated wall clock: how long each cloud round would take on the cluster the topology describes.

A run measures compute (each edge round's slowest device) and counts every byte per link; the
topology gives a `LinkModel` (latency + bytes / bandwidth) per link and a relative `speed` per
device. Replaying a run's metrics rows through those models gives a per-round duration that does not
depend on how many ranks shared the cores of the machine that ran it, so sweeps can compare
time-to-accuracy, not only rounds. The model (docs/launch.md, "Simulated wall clock"):

    edge round (edge e):  down_e + compute_e / min speed_e + up_e + aggregate_e
        down_e / up_e = the slowest of e's device links carrying e's device-edge bytes of that edge
                        round, split evenly over the device ranks that took part (a device rank is
                        one physical device: its virtual clients share its link, one after another)
    cloud round:          max over edges e of  [cloud->e  +  sum of e's edge rounds  +  e->cloud]
                          + the cloud's own aggregation
        cloud<->e         = e's edge-cloud link carrying the round's edge-cloud bytes / edges
    flat cloud round:     down + compute / min speed + up + aggregate, over the device-cloud links

Links work in parallel (each device has its own); a link that carried no bytes costs nothing (no
latency). Round 0 (evaluation of the untrained model) takes no simulated time. Pure: no MPI.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

from hierfed.topology import DeviceSpec, LinkModel, Placement


@dataclass(frozen=True)
class RoundTime:
    """One cloud round on the modelled cluster: total and its parts along the critical path."""

    round: int
    seconds: float  # simulated duration of the round
    compute: float  # device compute on the critical path (speed-scaled)
    communication: float  # link time on the critical path
    clock: float  # simulated time at the end of the round (sum of the rounds so far)


def _link_seconds(link: LinkModel, nbytes: float) -> float:
    return link.seconds(int(round(nbytes))) if nbytes > 0 else 0.0


def _bytes(row: dict[str, Any], link: str) -> tuple[float, float]:
    d = (row.get("bytes") or {}).get(link) or {}
    return float(d.get("up", 0)), float(d.get("down", 0))


def _device_phase(row: dict[str, Any], link_name: str, devices: Iterable[DeviceSpec]) -> tuple[float, float]:
    """(compute, communication) of one aggregation step among `devices` and their parent."""
    devices = list(devices)
    up, down = _bytes(row, link_name)
    clients = int(row.get("clients") or len(devices))
    active = max(1, min(len(devices), clients))  # device ranks that took part
    down_s = max(_link_seconds(d.link, down / active) for d in devices)
    up_s = max(_link_seconds(d.link, up / active) for d in devices)
    secs = row.get("seconds") or {}
    compute = float(secs.get("compute", 0.0)) / min(d.speed for d in devices)
    return compute + float(secs.get("aggregate", 0.0)), down_s + up_s


def round_times(rows: list[dict[str, Any]], placement: Placement) -> list[RoundTime]:
    """Simulated time of every cloud round in a run's metrics rows (metrics.jsonl), in order."""
    cloud = sorted((r for r in rows if r.get("tier") == "cloud"), key=lambda r: r["round"])
    edge_rows: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("tier") == "edge":
            edge_rows[r["round"]].append(r)
    out: list[RoundTime] = []
    clock = 0.0
    for row in cloud:
        t = row["round"]
        if t == 0:
            out.append(RoundTime(0, 0.0, 0.0, 0.0, 0.0))
            continue
        if placement.flat:
            work, comm = _device_phase(row, "device-cloud", placement.devices)
            secs, compute = work + comm, work
        else:
            secs, compute, comm = _hierarchical(row, edge_rows.get(t, []), placement)
        clock += secs
        out.append(RoundTime(t, secs, compute, comm, clock))
    return out


def _hierarchical(row: dict[str, Any], erows: list[dict[str, Any]], p: Placement) -> tuple[float, float, float]:
    by_edge: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in erows:
        by_edge[r.get("edge", "")].append(r)
    up, down = _bytes(row, "edge-cloud")
    taking_part = [e for e in p.edges if by_edge.get(e.name)] or list(p.edges)
    share_up, share_down = up / len(taking_part), down / len(taking_part)
    best = (0.0, 0.0, 0.0)  # the critical edge: (total, compute, communication)
    edge_agg = 0.0
    for e in taking_part:
        work = comm = agg = 0.0
        for r in sorted(by_edge.get(e.name, []), key=lambda r: r.get("edge_round") or 0):
            w, c = _device_phase(r, "device-edge", e.devices)
            work, comm = work + w, comm + c
            agg += float((r.get("seconds") or {}).get("aggregate", 0.0))
        comm += _link_seconds(e.link, share_down) + _link_seconds(e.link, share_up)
        edge_agg = max(edge_agg, agg)
        if work + comm > best[0]:
            best = (work + comm, work, comm)
    # the cloud row's aggregate = the cloud's own + the slowest edge's (already counted above)
    cloud_agg = max(0.0, float((row.get("seconds") or {}).get("aggregate", 0.0)) - edge_agg)
    return best[0] + cloud_agg, best[1] + cloud_agg, best[2]
