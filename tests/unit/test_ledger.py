"""hierfed.comm.ledger: per-round and total byte counts, merging across ranks, per-link view."""

from __future__ import annotations

from hierfed.comm.ledger import Ledger, by_link, merge


def test_record_take_round_total() -> None:
    led = Ledger()
    led.record("device-edge", "up", 100)
    led.record("device-edge", "up", 50)
    led.record("edge-cloud", "down", 10, kind="control")
    assert led.take_round() == {
        ("device-edge", "up", "payload"): 150,
        ("device-edge", "up", "raw"): 150,  # uncompressed: raw == sent
        ("edge-cloud", "down", "control"): 10,
    }
    assert led.take_round() == {}  # a new round starts empty
    led.record("device-edge", "up", 7, raw=28)  # a compressed payload and its float32 size
    assert led.take_round() == {("device-edge", "up", "payload"): 7, ("device-edge", "up", "raw"): 28}
    assert led.total == {
        ("device-edge", "up", "payload"): 157,
        ("device-edge", "up", "raw"): 178,
        ("edge-cloud", "down", "control"): 10,
    }


def test_total_is_a_copy() -> None:
    led = Ledger()
    led.record("edge-cloud", "up", 1)
    led.total[("edge-cloud", "up", "payload")] = 999
    assert led.total[("edge-cloud", "up", "payload")] == 1


def test_merge_sums_per_key() -> None:
    a = {("device-edge", "up", "payload"): 3, ("edge-cloud", "up", "payload"): 1}
    b = {("device-edge", "up", "payload"): 4, ("edge-cloud", "down", "control"): 2}
    assert merge([a, b, {}]) == {
        ("device-edge", "up", "payload"): 7,
        ("edge-cloud", "up", "payload"): 1,
        ("edge-cloud", "down", "control"): 2,
    }
    assert merge([]) == {}


def test_by_link_sums_kinds_per_direction() -> None:
    counts = {
        ("device-edge", "up", "payload"): 100,
        ("device-edge", "up", "control"): 5,
        ("device-edge", "down", "payload"): 30,
        ("edge-cloud", "down", "control"): 8,
    }
    assert by_link(counts) == {"device-edge": {"up": 105, "down": 30}, "edge-cloud": {"up": 0, "down": 8}}
    assert by_link({}) == {}


def test_by_link_raw_view_replaces_payload_with_its_uncompressed_size() -> None:
    counts = {
        ("device-edge", "up", "payload"): 25,
        ("device-edge", "up", "raw"): 100,
        ("device-edge", "up", "control"): 5,
    }
    assert by_link(counts) == {"device-edge": {"up": 30, "down": 0}}
    assert by_link(counts, raw=True) == {"device-edge": {"up": 105, "down": 0}}
