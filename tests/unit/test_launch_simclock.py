"""hierfed.sim.clock: simulated round durations from metrics rows and the topology's link models."""

from __future__ import annotations

import pytest

from hierfed.sim.clock import round_times
from hierfed.topology import parse_topology

LINKS = {"edge_cloud": {"bandwidth_mbps": 1000, "latency_ms": 20}, "device_edge": {"bandwidth_mbps": 100, "latency_ms": 10},
         "device_cloud": {"bandwidth_mbps": 50, "latency_ms": 40}}


def hier(edges: int, devices: int, **extra):
    return parse_topology({"links": LINKS, "edges": [{"devices": [{"ranks": devices, **extra}]} for _ in range(edges)]}, "t").placement()


def cloud_row(t: int, ec_up: int, ec_down: int, agg: float = 0.0, **links) -> dict:
    return {"round": t, "tier": "cloud", "seconds": {"aggregate": agg, "compute": 0.0},
            "bytes": {"edge-cloud": {"up": ec_up, "down": ec_down}, **links}}


def edge_row(t: int, s: int, edge: str, up: int, down: int, compute: float, agg: float = 0.0, clients: int = 2) -> dict:
    return {"round": t, "edge_round": s, "tier": "edge", "edge": edge, "clients": clients,
            "seconds": {"compute": compute, "aggregate": agg}, "bytes": {"device-edge": {"up": up, "down": down}}}


def test_round_zero_takes_no_time() -> None:
    times = round_times([{"round": 0, "tier": "cloud", "seconds": {}}], hier(1, 2))
    assert times[0].seconds == 0 and times[0].clock == 0


def test_hierarchical_round_is_the_slowest_edge_path() -> None:
    p = hier(2, 2)
    mb = 1_000_000
    rows = [
        cloud_row(0, 0, 0),
        # edge0: two edge rounds, 1 s of compute each; edge1: one slow edge round of 3 s
        edge_row(1, 1, "edge0", 2 * mb, 2 * mb, 1.0), edge_row(1, 2, "edge0", 2 * mb, 2 * mb, 1.0),
        edge_row(1, 1, "edge1", 2 * mb, 2 * mb, 3.0), edge_row(1, 2, "edge1", 0, 0, 0.0),
        cloud_row(1, 2 * mb, 2 * mb, agg=0.5),
    ]
    t = round_times(rows, p)[1]
    # per device: 1 MB each way over 100 Mb/s + 10 ms = 0.09 s; per edge: 1 MB each way over 1 Gb/s + 20 ms = 0.028 s
    dev, cloud = 0.01 + 8e6 / 100e6, 0.02 + 8e6 / 1000e6
    edge0 = 2 * (2 * dev + 1.0) + 2 * cloud
    edge1 = (2 * dev + 3.0) + 2 * cloud  # its second edge round moved no bytes and cost nothing
    assert edge1 > edge0
    assert t.seconds == pytest.approx(edge1 + 0.5)
    assert t.compute == pytest.approx(3.0 + 0.5) and t.communication == pytest.approx(2 * dev + 2 * cloud)


def test_device_speed_scales_compute() -> None:
    slow = hier(1, 2, speed=0.25)
    rows = [cloud_row(1, 0, 0), edge_row(1, 1, "edge0", 0, 0, 1.0)]
    assert round_times(rows, slow)[0].compute == pytest.approx(4.0)


def test_flat_round_uses_the_device_cloud_links_and_clock_accumulates() -> None:
    p = parse_topology({"links": LINKS, "devices": [{"ranks": 4}]}, "t").placement()
    row = {"tier": "cloud", "clients": 4, "seconds": {"compute": 2.0, "aggregate": 0.0},
           "bytes": {"device-cloud": {"up": 4 * 500_000, "down": 4 * 500_000}}}
    times = round_times([{**row, "round": 1}, {**row, "round": 2}], p)
    per_link = 0.04 + 8 * 500_000 / 50e6
    assert times[0].seconds == pytest.approx(2.0 + 2 * per_link)
    assert times[1].clock == pytest.approx(2 * times[0].seconds)


def test_virtual_clients_share_their_rank_link() -> None:
    p = hier(1, 2, clients=10)  # 20 clients on 2 device ranks
    rows = [cloud_row(1, 0, 0), edge_row(1, 1, "edge0", 20 * 100_000, 0, 0.0, clients=20)]
    # the rank's share is 10 clients' uploads: 1 MB over its 100 Mb/s link
    assert round_times(rows, p)[0].communication == pytest.approx(0.01 + 8e6 / 100e6)
