"""Topology schema, validation messages and rank placement (pure: no MPI)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hierfed.errors import HierfedError
from hierfed.topology import (
    EMBEDDED_DEFAULT,
    LinkModel,
    Placement,
    Topology,
    load_topology,
    parse_topology,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "topologies").glob("*.yaml"))


def parse(data: dict) -> Topology:
    return parse_topology(data, "t.yaml")


def error_of(data: object) -> str:
    with pytest.raises(HierfedError) as e:
        parse_topology(data, "t.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("t.yaml: ")
    return msg


def check_invariants(p: Placement) -> None:
    """What every placement must satisfy, whatever the file."""
    assert [p.role(r).rank for r in range(p.world_size)] == list(range(p.world_size))
    assert p.role(0).kind == "cloud" and p.cloud_rank == 0
    assert [d.rank for d in p.devices] == sorted(d.rank for d in p.devices)
    ids = [c for d in p.devices for c in d.clients] + [c for e in p.edges for c in e.clients]
    assert ids == list(range(p.num_clients))  # device-rank order, then edges' own clients; no gaps
    for e in p.edges:
        members = list(e.ranks) + list(e.device_ranks)
        assert members == list(range(members[0], members[0] + len(members)))  # contiguous
        assert e.leader == e.ranks[0] and p.role(e.leader).group_index == 0
        assert [d.index for d in e.devices] == list(range(len(e.devices)))
    kinds = [p.role(r).kind for r in range(p.world_size)]
    assert kinds.count("device") == len(p.devices)
    assert kinds.count("edge") == sum(len(e.ranks) for e in p.edges)


# ------------------------------------------------------------------------- shipped files ---


def test_all_four_files_are_shipped() -> None:
    assert {p.stem for p in SHIPPED} >= {"default", "flat", "uneven", "virtual"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_file_validates_and_states_its_arithmetic(path: Path) -> None:
    topo = load_topology(path)
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(f"# {topo.arithmetic()}"), (first, topo.arithmetic())
    # The number in the comment is really the world size (not just a string that matches).
    stated = re.search(r"= (\d+) ranks", first)
    assert stated and int(stated.group(1)) == topo.world_size
    # ... and the spelled-out terms add up: "1 cloud + 2 edges × (1 + 2 devices)" -> 1 + 2*(1 + 2)
    expr = re.sub(r"[a-z]+", "", first[1:].split("=")[0]).replace("×", "*")
    assert re.fullmatch(r"[\d\s+*()]+", expr), expr
    assert eval(expr) == topo.world_size  # noqa: S307 (digits, +, * and parentheses only)
    assert topo.name == path.stem
    check_invariants(topo.placement())


def test_default_is_byte_identical_to_embedded_copy() -> None:
    assert (ROOT / "topologies" / "default.yaml").read_bytes() == EMBEDDED_DEFAULT.read_bytes()


def test_default_placement() -> None:
    p = load_topology(ROOT / "topologies" / "default.yaml").placement()
    assert p.summary() == "default: 1 cloud + 2 edges × (1 + 2 devices) = 7 ranks, 4 clients"
    assert [e.ranks for e in p.edges] == [(1,), (4,)]
    assert [e.device_ranks for e in p.edges] == [(2, 3), (5, 6)]
    assert [d.name for d in p.devices] == ["edge0/d0", "edge0/d1", "edge1/d0", "edge1/d1"]
    assert [tuple(d.clients) for d in p.devices] == [(0,), (1,), (2,), (3,)]
    assert p.devices[0].link == LinkModel(100, 10) and p.edges[0].link == LinkModel(1000, 20)
    assert (p.devices[0].memory_gb, p.devices[0].speed, p.devices[0].device_class) == (16, 1.0, None)


def test_flat_matches_default_clients() -> None:
    flat = load_topology(ROOT / "topologies" / "flat.yaml").placement()
    default = load_topology(ROOT / "topologies" / "default.yaml").placement()
    assert flat.flat and flat.edges == () and flat.world_size == 5
    assert flat.num_clients == default.num_clients == 4
    assert flat.topology.arithmetic() == "1 cloud + 4 devices = 5 ranks"
    assert [(d.rank, d.edge, d.index, d.name) for d in flat.devices] == [
        (1, None, 0, "d0"), (2, None, 1, "d1"), (3, None, 2, "d2"), (4, None, 3, "d3")]
    assert flat.devices[0].link == LinkModel(50, 40)  # links.device_cloud
    assert flat.role(3).edge is None and flat.role(3).name == "d2"


def test_virtual_clients() -> None:
    p = load_topology(ROOT / "topologies" / "virtual.yaml").placement()
    assert p.world_size == 7 and p.num_clients == 100
    assert [(d.clients[0], d.clients[-1], len(d.clients)) for d in p.devices] == [
        (0, 24, 25), (25, 49, 25), (50, 74, 25), (75, 99, 25)]
    assert [e.num_clients for e in p.edges] == [50, 50]
    assert p.summary().endswith("7 ranks, 100 clients")


# --------------------------------------------------------------------------- placement ---


UNEVEN = {
    "name": "u",
    "device_classes": {"laptop": {"memory_gb": 16, "speed": 1.0}, "phone": {"memory_gb": 4, "speed": 0.3}},
    "links": {"device_edge": {"bandwidth_mbps": 80}},  # latency stays at the built-in 10 ms
    "edges": [
        {"name": "big", "ranks": 2, "devices": [
            {"ranks": 2, "class": "laptop", "clients": 3},
            {"class": "phone", "memory_gb": 6, "split_layers": 2, "link": {"latency_ms": 50}}]},
        {"devices": [{"class": "phone", "speed": 0.1, "split_layers": "auto"}]},
        {"ranks": 3, "link": {"bandwidth_mbps": 10, "latency_ms": 0}, "devices": [{"split_layers": "all"}]},
    ],
}


def test_uneven_placement_ranks_leaders_and_clients() -> None:
    topo = parse(UNEVEN)
    p = topo.placement()
    check_invariants(p)
    # cloud 0 | big: edge 1-2, devices 3-5 | edge1: edge 6, device 7 | edge2: edge 8-10, device 11
    assert p.world_size == topo.world_size == 12
    assert topo.arithmetic() == "1 cloud + edges (2 + 3 devices) + (1 + 1 device) + (3 + 1 device) = 12 ranks"
    assert [e.name for e in p.edges] == ["big", "edge1", "edge2"]
    assert [e.ranks for e in p.edges] == [(1, 2), (6,), (8, 9, 10)]
    assert [e.leader for e in p.edges] == [1, 6, 8]
    assert [e.device_ranks for e in p.edges] == [(3, 4, 5), (7,), (11,)]
    assert [tuple(d.clients) for d in p.devices] == [(0, 1, 2), (3, 4, 5), (6,), (7,), (8,)]
    assert p.num_clients == 9 and [e.num_clients for e in p.edges] == [7, 1, 1]


def test_uneven_device_attributes_and_links() -> None:
    p = parse(UNEVEN).placement()
    d = {x.name: x for x in p.devices}
    assert (d["big/d0"].memory_gb, d["big/d0"].speed, d["big/d0"].device_class) == (16, 1.0, "laptop")
    assert (d["big/d2"].memory_gb, d["big/d2"].speed) == (6, 0.3)  # inline memory overrides class
    assert d["edge1/d0"].speed == 0.1 and d["edge1/d0"].memory_gb == 4
    assert (d["edge2/d0"].memory_gb, d["edge2/d0"].speed, d["edge2/d0"].device_class) == (16, 1.0, None)
    assert [x.split_layers for x in p.devices] == [None, None, 2, "auto", None]  # "all" -> None
    assert d["big/d0"].link == LinkModel(80, 10)  # links.device_edge merged with built-in default
    assert d["big/d2"].link == LinkModel(80, 50)  # group override on top
    assert p.edges[0].link == LinkModel(1000, 20) and p.edges[2].link == LinkModel(10, 0)


def test_role_for_every_rank() -> None:
    p = parse(UNEVEN).placement()
    got = [(r.kind, r.rank, r.name, r.edge, r.group_index) for r in map(p.role, range(p.world_size))]
    assert got == [
        ("cloud", 0, "cloud", None, 0),
        ("edge", 1, "big", 0, 0), ("edge", 2, "big", 0, 1),
        ("device", 3, "big/d0", 0, 0), ("device", 4, "big/d1", 0, 0), ("device", 5, "big/d2", 0, 0),
        ("edge", 6, "edge1", 1, 0), ("device", 7, "edge1/d0", 1, 0),
        ("edge", 8, "edge2", 2, 0), ("edge", 9, "edge2", 2, 1), ("edge", 10, "edge2", 2, 2),
        ("device", 11, "edge2/d0", 2, 0),
    ]
    for r in range(p.world_size):
        role = p.role(r)
        assert (role.device is not None) == (role.kind == "device")
        if role.device:
            assert role.device.rank == r and role.device is p.devices[[d.rank for d in p.devices].index(r)]
    for bad in (-1, p.world_size, 100):
        with pytest.raises(ValueError, match="outside topology"):
            p.role(bad)


def test_check_world_size() -> None:
    p = parse(UNEVEN).placement()
    p.check_world_size(12)
    with pytest.raises(HierfedError, match=r"needs .* = 12 ranks, but the job has 7 ranks \(use mpiexec -n 12\)"):
        p.check_world_size(7)


def test_arithmetic_wording() -> None:
    one = parse({"edges": [{"devices": [{}]}]})
    assert one.arithmetic() == "1 cloud + 1 edge × (1 + 1 device) = 3 ranks"
    assert one.placement().summary() == "t: 1 cloud + 1 edge × (1 + 1 device) = 3 ranks, 1 client"
    assert parse({"devices": [{}]}).arithmetic() == "1 cloud + 1 device = 2 ranks"
    groups = parse({"edges": [{"devices": [{"ranks": 2}, {"ranks": 1}]}] * 3})
    assert groups.arithmetic() == "1 cloud + 3 edges × (1 + 3 devices) = 13 ranks"


def test_placement_is_frozen() -> None:
    p = parse({"devices": [{}]}).placement()
    with pytest.raises(AttributeError):
        p.world_size = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        p.devices[0].rank = 5  # type: ignore[misc]


def test_link_seconds() -> None:
    link = LinkModel(bandwidth_mbps=100, latency_ms=10)
    assert link.seconds(0) == pytest.approx(0.010)
    assert link.seconds(12_500_000) == pytest.approx(0.010 + 1.0)  # 100 Mbit = 12.5 MB takes 1 s
    assert LinkModel(8, 0).seconds(1_000_000) == pytest.approx(1.0)
    assert str(link) == "100 Mb/s, 10 ms"
    with pytest.raises(ValueError):
        LinkModel(0, 1)
    with pytest.raises(ValueError):
        LinkModel(1, -1)


# -------------------------------------------------------------------------- bad fields ---


def hier(**group: object) -> dict:
    return {"edges": [{"devices": [{}]}, {"devices": [group]}]}


@pytest.mark.parametrize("data, expected", [
    (hier(ranks=0), "t.yaml: edges[1].devices[0].ranks: must be >= 1 (got 0)"),
    (hier(clients=0), "t.yaml: edges[1].devices[0].clients: must be >= 1 (got 0)"),
    (hier(ranks="2"), "t.yaml: edges[1].devices[0].ranks: must be an integer (got '2')"),
    (hier(ranks=True), "t.yaml: edges[1].devices[0].ranks: must be an integer (got true)"),
    (hier(memory_gb=0), "t.yaml: edges[1].devices[0].memory_gb: must be > 0 (got 0)"),
    (hier(speed=-1.5), "t.yaml: edges[1].devices[0].speed: must be > 0 (got -1.5)"),
    (hier(memory_gb=float("inf")), "t.yaml: edges[1].devices[0].memory_gb: must be a finite number (got inf)"),
    ({"edges": [{"ranks": 0, "devices": [{}]}]}, "t.yaml: edges[0].ranks: must be >= 1 (got 0)"),
    ({"edges": [{"fanout": 3, "devices": [{}]}]},
     "t.yaml: edges[0]: unknown field 'fanout' (allowed: name, ranks, memory_gb, tflops, link, devices, train_locally)"),
    ({"fanout": 3, "devices": [{}]}, "t.yaml: top level: unknown field 'fanout' "
     "(allowed: name, description, links, device_classes, edges, devices)"),
    (hier(colour="red"), "t.yaml: edges[1].devices[0]: unknown field 'colour' "
     "(allowed: memory_gb, speed, tflops, availability, dropout, diurnal, ranks, clients, class, split_layers, link)"),
    ({"links": {"edge_cloud": {"bandwith_mbps": 5}}, "devices": [{}]},
     "t.yaml: links.edge_cloud: unknown field 'bandwith_mbps' (allowed: bandwidth_mbps, latency_ms)"),
    ({"edges": [{"devices": [{}]}], "devices": [{}]}, "t.yaml: edges/devices: give exactly one of 'edges' "
     "(hierarchical) or 'devices' (flat); both are given"),
    ({"name": "x"}, "t.yaml: edges/devices: give exactly one of 'edges' (hierarchical) or 'devices' (flat); "
     "neither is given"),
    ({"edges": [{"devices": [{}], "link": {"bandwidth_mbps": -5}}]},
     "t.yaml: edges[0].link.bandwidth_mbps: must be > 0 (got -5)"),
    ({"links": {"device_cloud": {"bandwidth_mbps": 0}}, "devices": [{}]},
     "t.yaml: links.device_cloud.bandwidth_mbps: must be > 0 (got 0)"),
    (hier(link={"latency_ms": -1}), "t.yaml: edges[1].devices[0].link.latency_ms: must be >= 0 (got -1)"),
    ({"edges": [{"name": "a", "devices": [{}]}, {"name": "a", "devices": [{}]}]},
     "t.yaml: edges[1].name: duplicate edge name 'a'"),
    ({"edges": [{"name": "edge1", "devices": [{}]}, {"devices": [{}]}]},  # clashes with the default name
     "t.yaml: edges[1].name: duplicate edge name 'edge1'"),
    ({"edges": [{"name": "a/b", "devices": [{}]}]},
     "t.yaml: edges[0].name: must be a non-empty word without '/' or spaces, not 'cloud' (got 'a/b')"),
    (hier(split_layers=0), "t.yaml: edges[1].devices[0].split_layers: must be an integer >= 1, 'all', "
     "'auto' or null (got 0)"),
    (hier(split_layers="half"), "t.yaml: edges[1].devices[0].split_layers: must be an integer >= 1, 'all', "
     "'auto' or null (got 'half')"),
    (hier(split_layers=1.5), "t.yaml: edges[1].devices[0].split_layers: must be an integer >= 1, 'all', "
     "'auto' or null (got 1.5)"),
    ({"edges": [{"devices": []}]}, "t.yaml: edges[0].devices: must not be empty"),
    ({"edges": [{"name": "x"}]}, "t.yaml: edges[0].devices: required field is missing"),
    ({"edges": []}, "t.yaml: edges: must not be empty"),
    ({"devices": "four"}, "t.yaml: devices: must be a list (got 'four')"),
    ({"devices": [4]}, "t.yaml: devices[0]: must be a mapping (got 4)"),
    ({"edges": [{"devices": [{"ranks": 2.5, "clients": 0}]}]},
     "t.yaml: edges[0].devices[0].ranks: must be an integer (got 2.5) (and 1 more problem)"),
    ({"device_classes": {"tiny": {"colour": 1}}, "devices": [{}]},
     "t.yaml: device_classes.tiny: unknown field 'colour' (allowed: memory_gb, speed, tflops, availability, dropout, diurnal)"),
    ({"device_classes": {"phone": {"memory_gb": 4}}, "devices": [{"class": "tablet"}]},
     "t.yaml: devices[0].class: unknown device class 'tablet' (known: phone)"),
    (hier(**{"class": "laptop"}),
     "t.yaml: edges[1].devices[0].class: unknown device class 'laptop' (known: none defined in device_classes)"),
    ({"description": 3, "devices": [{}]}, "t.yaml: description: must be a string (got 3)"),
    ({"edges": [{"train_locally": "yes", "devices": [{}]}]}, "t.yaml: edges[0].train_locally: must be a boolean (got 'yes')"),
    ([1, 2], "t.yaml: top level must be a mapping of topology fields (got a list)"),
    (None, "t.yaml: top level must be a mapping of topology fields (got an empty file)"),
    ("edges", "t.yaml: top level must be a mapping of topology fields (got 'edges')"),
])
def test_bad_field_message(data: object, expected: str) -> None:
    assert error_of(data) == expected


# ----------------------------------------------------------------------------- loading ---


def write(tmp_path: Path, text: str, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_path_and_name_default(tmp_path: Path) -> None:
    path = write(tmp_path, "devices:\n  - ranks: 3\n", "mine.yaml")
    topo = load_topology(path)
    assert (topo.name, topo.source, topo.world_size, topo.flat) == ("mine", str(path), 4, True)
    assert load_topology(str(path)).world_size == 4


def test_bare_name_looks_in_topologies_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "topologies").mkdir()
    write(tmp_path / "topologies", "name: local\ndevices: [{ranks: 2}]\n", "small.yaml")
    write(tmp_path / "topologies", "name: mydefault\ndevices: [{ranks: 1}]\n", "default.yaml")
    monkeypatch.chdir(tmp_path)
    assert load_topology("small").name == "local"
    assert load_topology("small").source == "topologies/small.yaml"
    assert load_topology("default").name == "mydefault"  # a local default wins over the embedded one


def test_default_name_falls_back_to_embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    topo = load_topology("default")
    assert topo.source == str(EMBEDDED_DEFAULT) and topo.world_size == 7


def test_unknown_name_lists_what_was_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(HierfedError) as e:
        load_topology("nope")
    msg = str(e.value)
    assert "\n" not in msg and "unknown topology 'nope'" in msg and "topologies/nope.yaml" in msg
    known = msg.split("known names here: ")[1].split(";")[0].split(", ")
    assert known == sorted(known) and {"default", "flat", "uneven", "virtual"} <= set(known)


@pytest.mark.parametrize("text, expected", [
    ("edges: [\n", "invalid YAML at line 2"),
    ("a: 1\n  b: 2\n", "invalid YAML at line 2"),
    ("devices: [{ranks: 1}]\ndevices: [{ranks: 2}]\n", "invalid YAML at line 2, column 1: duplicate key 'devices'"),
    ("", "top level must be a mapping of topology fields (got an empty file)"),
    ("- 1\n- 2\n", "top level must be a mapping of topology fields (got a list)"),
    ("edges:\n  - devices:\n      - ranks: 0\n", "edges[0].devices[0].ranks: must be >= 1 (got 0)"),
])
def test_bad_files(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(HierfedError) as e:
        load_topology(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ") and expected in msg, msg


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(HierfedError, match=r"^.*/missing\.yaml: no such topology file$"):
        load_topology(tmp_path / "missing.yaml")
    with pytest.raises(HierfedError, match="not a file$"):
        load_topology(tmp_path)
    with pytest.raises(HierfedError, match="empty name"):
        load_topology("")


def test_module_is_pure() -> None:
    """The topology layer must import without MPI or torch (it runs in the CLI and in unit tests)."""
    import subprocess
    import sys

    code = "import sys, hierfed.topology; print(sorted({'torch', 'mpi4py'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_an_edge_that_trains_locally_owns_the_next_client_ids() -> None:
    topo = parse_topology({"name": "own", "edges": [
        {"name": "a", "ranks": 2, "train_locally": True, "devices": [{"ranks": 2, "clients": 3}]},
        {"name": "b", "devices": [{"ranks": 1}]},
        {"name": "c", "train_locally": True, "devices": [{"ranks": 1}]},
    ]}, "own.yaml")
    p = topo.placement()
    assert [tuple(d.clients) for d in p.devices] == [(0, 1, 2), (3, 4, 5), (6,), (7,)]  # devices first, unchanged
    assert [tuple(e.clients) for e in p.edges] == [(8,), (), (9,)]  # then the edges' own, in edge order
    assert p.num_clients == topo.num_clients == 10
    assert [e.num_clients for e in p.edges] == [7, 1, 2]
    assert [sorted(e.all_clients) for e in p.edges] == [[0, 1, 2, 3, 4, 5, 8], [6], [7, 9]]
    assert p.world_size == 1 + 2 + 2 + 1 + 1 + 1 + 1  # an edge's own client adds no rank


def test_placement_memory_does_not_grow_with_virtual_clients() -> None:
    """A billion virtual clients on 7 ranks: client ids are ranges, so the Placement stays small."""
    import tracemalloc

    data = {"edges": [{"devices": [{"ranks": 2, "clients": 250_000_000}]} for _ in range(2)]}
    tracemalloc.start()
    p = parse_topology(data, "big.yaml").placement()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert p.world_size == 7 and p.num_clients == 1_000_000_000
    assert p.devices[-1].clients[-1] == 999_999_999 and 500_000_000 in p.devices[2].clients
    assert peak < 1_000_000, f"placement of 1e9 clients allocated {peak} bytes"
