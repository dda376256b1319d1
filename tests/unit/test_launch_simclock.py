"""hierfed.sim.clock: simulated round durations from metrics rows, the topology's links and device rates."""

from __future__ import annotations

import pytest

from hierfed.sim.clock import Rates, round_times
from hierfed.topology import parse_topology

LINKS = {"edge_cloud": {"bandwidth_mbps": 1000, "latency_ms": 20}, "device_edge": {"bandwidth_mbps": 100, "latency_ms": 10},
         "device_cloud": {"bandwidth_mbps": 50, "latency_ms": 40}}
RATES = Rates(reference_tflops=1.0, edge_tflops=10.0, cloud_tflops=100.0)
TF = 1e12  # one second of a 1 TFLOP/s device


def hier(edges: int, devices: int, **extra):
    return parse_topology({"links": LINKS, "edges": [{"devices": [{"ranks": devices, **extra}]} for _ in range(edges)]}, "t").placement()


def cloud_row(t: int, ec_up: int, ec_down: int, agg: float = 0.0, **links) -> dict:
    return {"round": t, "tier": "cloud", "seconds": {"aggregate": agg, "compute": 0.0},
            "bytes": {"edge-cloud": {"up": ec_up, "down": ec_down}, **links}}


def work(client: int, flops: float, up: float = 0.0, seconds: float = 0.0, **extra) -> dict:
    return {"client": client, "steps": 1, "flops": flops, "seconds": seconds, "up": up, **extra}


def edge_row(t: int, s: int, edge: str, down: int, items: list[dict], agg: float = 0.0) -> dict:
    return {"round": t, "edge_round": s, "tier": "edge", "edge": edge, "clients": len(items), "receivers": len(items),
            "seconds": {"aggregate": agg}, "bytes": {"device-edge": {"up": sum(w["up"] for w in items), "down": down}}, "work": items}


def test_round_zero_takes_no_time() -> None:
    times = round_times([{"round": 0, "tier": "cloud", "seconds": {}}], hier(1, 2), RATES)
    assert times[0].seconds == 0 and times[0].clock == 0


def test_hierarchical_round_is_the_slowest_edge_path() -> None:
    p = hier(2, 2)  # clients 0, 1 under edge0; 2, 3 under edge1
    mb = 1_000_000
    rows = [
        cloud_row(0, 0, 0),
        # edge0: two edge rounds of 1 s of compute per client; edge1: one slow client of 3 s, then an empty round
        edge_row(1, 1, "edge0", 2 * mb, [work(0, TF, mb), work(1, 0.5 * TF, mb)]),
        edge_row(1, 2, "edge0", 2 * mb, [work(0, TF, mb), work(1, TF, mb)]),
        edge_row(1, 1, "edge1", 2 * mb, [work(2, 3 * TF, mb), work(3, TF, mb)]),
        edge_row(1, 2, "edge1", 0, []),
        cloud_row(1, 2 * mb, 2 * mb),
    ]
    t = round_times(rows, p, RATES, dim=0)[1]
    # per client: 1 MB each way over 100 Mb/s + 10 ms; per edge: 1 MB each way over 1 Gb/s + 20 ms
    dev, cloud = 0.01 + 8e6 / 100e6, 0.02 + 8e6 / 1000e6
    edge0 = 2 * (2 * dev + 1.0) + 2 * cloud
    edge1 = (2 * dev + 3.0) + 2 * cloud  # its second edge round moved no bytes and cost nothing
    assert edge1 > edge0
    assert t.seconds == pytest.approx(edge1)
    assert t.compute == pytest.approx(3.0) and t.communication == pytest.approx(2 * dev + 2 * cloud)


def test_device_rate_sets_compute_time() -> None:
    rows = [cloud_row(1, 0, 0), edge_row(1, 1, "edge0", 0, [work(0, TF), work(1, TF)])]
    slow = round_times(rows, hier(1, 2, speed=0.25), RATES)[0]  # speed x reference_tflops = 0.25 TFLOP/s
    fixed = round_times(rows, hier(1, 2, speed=0.25, tflops=2.0), RATES)[0]  # an absolute rate wins over speed
    assert slow.compute == pytest.approx(4.0) and fixed.compute == pytest.approx(0.5)


def test_measured_mode_divides_seconds_by_speed() -> None:
    rows = [cloud_row(1, 0, 0, agg=0.5), edge_row(1, 1, "edge0", 0, [work(0, TF, seconds=2.0), work(1, TF, seconds=1.0)], agg=0.25)]
    t = round_times(rows, hier(1, 2, speed=0.5), Rates(compute="measured", reference_tflops=1.0))[0]
    # the slowest client (2 s / 0.5) + the edge's measured aggregation + the cloud's own (0.5 - 0.25)
    assert t.seconds == pytest.approx(4.0 + 0.25 + 0.25)


def test_the_slowest_class_is_the_straggler() -> None:
    p = parse_topology({"links": LINKS, "device_classes": {"phone": {"tflops": 0.1}, "laptop": {"tflops": 1.0}},
                        "edges": [{"devices": [{"ranks": 2, "class": "laptop"}, {"ranks": 1, "class": "phone"}]}]}, "t").placement()
    rows = [cloud_row(1, 0, 0), edge_row(1, 1, "edge0", 0, [work(0, TF), work(1, TF), work(2, TF)])]
    assert round_times(rows, p, RATES)[0].compute == pytest.approx(10.0)  # the phone: 1 TFLOP at 0.1 TFLOP/s


def test_flat_round_uses_the_device_cloud_links_and_clock_accumulates() -> None:
    p = parse_topology({"links": LINKS, "devices": [{"ranks": 4}]}, "t").placement()
    row = {"tier": "cloud", "clients": 4, "receivers": 4, "seconds": {"aggregate": 0.0},
           "bytes": {"device-cloud": {"up": 4 * 500_000, "down": 4 * 500_000}},
           "work": [work(c, 2 * TF, 500_000) for c in range(4)]}
    times = round_times([{**row, "round": 1}, {**row, "round": 2}], p, RATES, dim=1000)
    per_link = 0.04 + 8 * 500_000 / 50e6
    agg = 2 * 4 * 1000 / 100e12  # 2·n·dim FLOPs at the cloud's rate
    assert times[0].seconds == pytest.approx(2.0 + 2 * per_link + agg)
    assert times[1].clock == pytest.approx(2 * times[0].seconds)


def test_virtual_clients_are_devices_of_their_own() -> None:
    """20 virtual phones on 2 ranks work side by side, each over its own link."""
    p = hier(1, 2, clients=10)
    rows = [cloud_row(1, 0, 0), edge_row(1, 1, "edge0", 0, [work(c, TF, 100_000) for c in range(20)])]
    t = round_times(rows, p, RATES)[0]
    assert t.compute == pytest.approx(1.0)  # not 10 clients one after another
    assert t.communication == pytest.approx(0.01 + 8 * 100_000 / 100e6)


def test_a_split_clients_upper_blocks_run_at_its_edge_rate() -> None:
    p = parse_topology({"links": LINKS, "edges": [{"tflops": 4.0, "devices": [{"ranks": 1, "split_layers": 1}]}]}, "t").placement()
    rows = [cloud_row(1, 0, 0), edge_row(1, 1, "edge0", 0, [work(0, TF, edge_flops=2 * TF)])]
    assert round_times(rows, p, RATES)[0].compute == pytest.approx(1.0 + 0.5)


def test_same_rows_same_times() -> None:
    """The model mode depends on the rows and the topology only: replaying twice gives identical times."""
    p = hier(2, 2)
    rows = [cloud_row(1, 10, 10), edge_row(1, 1, "edge0", 100, [work(0, 1.5 * TF, 7), work(1, TF, 9)]),
            edge_row(1, 1, "edge1", 100, [work(2, TF, 3), work(3, 0.5 * TF, 5)])]
    assert round_times(rows, p, RATES, dim=123) == round_times(list(rows), p, RATES, dim=123)


def test_the_model_clock_ignores_what_this_host_measured() -> None:
    """The host's measured seconds (compute, aggregation) may be anything: a loaded 2-core host, a
    GPU; the simulated times are the same, so a point run again gives the same clock."""
    p = hier(2, 2)

    def rows(scale: float) -> list[dict]:
        return [cloud_row(1, 10, 10, agg=0.3 * scale),
                edge_row(1, 1, "edge0", 100, [work(0, 1.5 * TF, 7, seconds=2.0 * scale), work(1, TF, 9, seconds=scale)], agg=0.1 * scale),
                edge_row(1, 1, "edge1", 100, [work(2, TF, 3, seconds=5.0 * scale), work(3, 0.5 * TF, 5)], agg=scale)]

    assert round_times(rows(1.0), p, RATES, dim=123) == round_times(rows(37.0), p, RATES, dim=123)
