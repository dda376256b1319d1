"""The resolved topology (pure: no MPI, no torch): link models, device and edge groups, and the
`Placement` that maps every MPI rank to a `Role` once, so no code ever asks `rank == 0`.

Rank order: cloud = 0; then per edge in file order its edge ranks followed by its device ranks
(an edge and its devices are contiguous); a flat topology puts its devices right after the cloud.
Virtual client ids are handed out in device-rank order, `clients` consecutive ids per rank; an
edge that trains a client of its own (`train_locally: true`) gets the next ids, in edge order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from hierfed.errors import HierfedError

DEFAULT_MEMORY_GB = 16.0
DEFAULT_SPEED = 1.0


# ---------------------------------------------------------------- resolved, immutable model ---


@dataclass(frozen=True)
class LinkModel:
    """A point-to-point link: fixed latency plus size / bandwidth."""

    bandwidth_mbps: float
    latency_ms: float

    def __post_init__(self) -> None:
        if not self.bandwidth_mbps > 0 or not self.latency_ms >= 0:
            raise ValueError(f"bad link {self}: need bandwidth_mbps > 0 and latency_ms >= 0")

    def seconds(self, nbytes: int) -> float:
        """Modelled transfer time of `nbytes` over this link."""
        return self.latency_ms / 1e3 + 8 * nbytes / (self.bandwidth_mbps * 1e6)

    def __str__(self) -> str:
        return f"{self.bandwidth_mbps:g} Mb/s, {self.latency_ms:g} ms"


DEFAULT_LINKS = {
    "edge_cloud": LinkModel(1000.0, 20.0),
    "device_edge": LinkModel(100.0, 10.0),
    "device_cloud": LinkModel(50.0, 40.0),
}


@dataclass(frozen=True)
class Behaviour:
    """How reliable a device is (hierfed.sim.behaviour draws from it): the probability of being
    reachable in an edge round it is sampled for, of vanishing mid-round after starting, and an
    optional periodic (diurnal) pattern scaling the availability with the cloud round t:
    availability x (1 - amplitude (1 - cos 2pi(t / period - phase)) / 2)."""

    availability: float = 1.0
    dropout: float = 0.0
    period: float | None = None  # cloud rounds; None: no pattern
    amplitude: float = 0.0
    phase: float = 0.0

    @property
    def reliable(self) -> bool:
        return self.availability == 1.0 and self.dropout == 0.0 and (self.period is None or self.amplitude == 0.0)


@dataclass(frozen=True)
class DeviceGroup:
    """A validated device group: `ranks` identical ranks, each simulating `clients` clients."""

    ranks: int
    clients: int
    device_class: str | None
    memory_gb: float
    speed: float
    split_layers: int | str | None  # None = whole model ("all" is normalised to None)
    link: LinkModel
    tflops: float | None = None  # compute rate for the simulated clock; None: speed x sim.reference_tflops
    behaviour: Behaviour = Behaviour()  # availability, dropout (hierfed.sim.behaviour)


@dataclass(frozen=True)
class EdgeGroup:
    """A validated edge: `ranks` edge ranks (one ZeRO group) and its device groups."""

    name: str
    ranks: int
    link: LinkModel
    groups: tuple[DeviceGroup, ...]
    train_locally: bool = False  # the edge trains a client of its own (whole model, on its ranks)
    memory_gb: float | None = None  # of each edge rank; None: not given, not checked
    tflops: float | None = None  # compute rate for the simulated clock; None: sim.edge_tflops

    @property
    def device_ranks(self) -> int:
        return sum(g.ranks for g in self.groups)


@dataclass(frozen=True)
class DeviceSpec:
    rank: int
    edge: int | None  # edge index, None in a flat topology
    index: int  # index among its edge's devices (or among all devices when flat)
    name: str  # "edge0/d1" (flat: "d3")
    clients: range  # global virtual client ids simulated by this rank (a range: no memory per client)
    memory_gb: float
    speed: float
    device_class: str | None
    split_layers: int | str | None
    link: LinkModel  # link to its parent (edge, or cloud when flat)
    tflops: float | None = None  # compute rate (simulated clock); None: speed x sim.reference_tflops
    behaviour: Behaviour = Behaviour()  # availability, dropout (hierfed.sim.behaviour)


@dataclass(frozen=True)
class EdgeSpec:
    index: int
    name: str
    ranks: tuple[int, ...]  # ranks[0] is the leader (talks to the cloud and to its devices)
    devices: tuple[DeviceSpec, ...]
    link: LinkModel  # link to the cloud
    clients: range = range(0)  # the client the edge trains itself (train_locally), if any
    memory_gb: float | None = None  # of each edge rank (its GPU); None: not given
    tflops: float | None = None  # compute rate (simulated clock); None: sim.edge_tflops

    @property
    def leader(self) -> int:
        return self.ranks[0]

    @property
    def device_ranks(self) -> tuple[int, ...]:
        return tuple(d.rank for d in self.devices)

    @property
    def split_devices(self) -> tuple[DeviceSpec, ...]:
        """Its devices with split_layers (they hold blocks [0, k); the edge holds the rest)."""
        return tuple(d for d in self.devices if d.split_layers is not None)

    def served(self, ks: dict[int, int | None]) -> tuple[DeviceSpec, ...]:
        """Its split devices as resolved (`placement.plan.split_plan`: rank -> k, None where `auto`
        found the whole model fits, which then trains whole), in topology order: the i-th is served
        by edge rank i mod G."""
        return tuple(d for d in self.devices if ks.get(d.rank) is not None)

    def servers(self, ks: dict[int, int | None]) -> dict[int, int]:
        """Split device rank -> the edge rank that serves it: the i-th of `served(ks)` goes to
        edge rank i mod G (every rank, device or edge, derives it the same way)."""
        return {d.rank: self.ranks[i % len(self.ranks)] for i, d in enumerate(self.served(ks))}

    @property
    def all_clients(self) -> set[int]:
        """Every client the edge aggregates: its devices' and its own."""
        return {c for d in self.devices for c in d.clients} | set(self.clients)

    @property
    def num_clients(self) -> int:
        return sum(len(d.clients) for d in self.devices) + len(self.clients)


@dataclass(frozen=True)
class Role:
    kind: Literal["cloud", "edge", "device"]
    rank: int
    name: str  # "cloud", "edge0", "edge0/d1"
    edge: int | None  # edge index for edge and device ranks in hierarchical topologies
    device: DeviceSpec | None  # for device ranks
    group_index: int  # position within the edge's ranks (0 = leader); 0 for cloud/devices


@dataclass(frozen=True)
class Topology:
    """A validated topology file; `placement()` turns it into ranks."""

    name: str
    description: str
    source: str
    flat: bool
    edges: tuple[EdgeGroup, ...]  # hierarchical; empty when flat
    devices: tuple[DeviceGroup, ...]  # flat; empty when hierarchical

    @property
    def world_size(self) -> int:
        if self.flat:
            return 1 + sum(g.ranks for g in self.devices)
        return 1 + sum(e.ranks + e.device_ranks for e in self.edges)

    @property
    def num_clients(self) -> int:
        groups = self.devices if self.flat else tuple(g for e in self.edges for g in e.groups)
        return sum(g.ranks * g.clients for g in groups) + sum(e.train_locally for e in self.edges)

    def arithmetic(self) -> str:
        """The rank arithmetic, e.g. "1 cloud + 2 edges × (1 + 2 devices) = 7 ranks"."""
        n = self.world_size
        if self.flat:
            return f"1 cloud + {_plural(n - 1, 'device')} = {n} ranks"
        shapes = [(e.ranks, e.device_ranks) for e in self.edges]
        if len(set(shapes)) == 1:
            r, d = shapes[0]
            return f"1 cloud + {_plural(len(shapes), 'edge')} × ({r} + {_plural(d, 'device')}) = {n} ranks"
        parts = " + ".join(f"({r} + {_plural(d, 'device')})" for r, d in shapes)
        return f"1 cloud + edges {parts} = {n} ranks"

    def placement(self) -> Placement:
        return Placement.build(self)


@dataclass(frozen=True)
class Placement:
    """Every rank's role, built once from a Topology."""

    topology: Topology = field(repr=False)
    world_size: int
    cloud_rank: int
    edges: tuple[EdgeSpec, ...]  # empty when flat
    devices: tuple[DeviceSpec, ...]  # all device ranks in rank order
    flat: bool
    num_clients: int
    roles: tuple[Role, ...] = field(repr=False)  # roles[rank]

    @classmethod
    def build(cls, topo: Topology) -> Placement:
        next_rank, next_client = 1, 0
        edges: list[EdgeSpec] = []
        devices: list[DeviceSpec] = []

        def place(groups: tuple[DeviceGroup, ...], edge: int | None, prefix: str) -> list[DeviceSpec]:
            nonlocal next_rank, next_client
            out: list[DeviceSpec] = []
            for g in groups:
                for _ in range(g.ranks):
                    ids = range(next_client, next_client + g.clients)
                    out.append(DeviceSpec(next_rank, edge, len(out), f"{prefix}d{len(out)}", ids,
                                          g.memory_gb, g.speed, g.device_class, g.split_layers, g.link, g.tflops, g.behaviour))
                    next_rank, next_client = next_rank + 1, next_client + g.clients
            return out

        if topo.flat:
            devices = place(topo.devices, None, "")
        for i, e in enumerate(topo.edges):
            ranks = tuple(range(next_rank, next_rank + e.ranks))
            next_rank += e.ranks
            devs = place(e.groups, i, f"{e.name}/")
            edges.append(EdgeSpec(i, e.name, ranks, tuple(devs), e.link, memory_gb=e.memory_gb, tflops=e.tflops))
            devices += devs
        for i, e in enumerate(topo.edges):  # edges' own clients come after every device's
            if e.train_locally:
                edges[i] = replace(edges[i], clients=range(next_client, next_client + 1))
                next_client += 1

        roles = [Role("cloud", 0, "cloud", None, None, 0)]
        roles += [Role("edge", r, e.name, e.index, None, j) for e in edges for j, r in enumerate(e.ranks)]
        roles += [Role("device", d.rank, d.name, d.edge, d, 0) for d in devices]
        roles.sort(key=lambda r: r.rank)
        assert [r.rank for r in roles] == list(range(topo.world_size)), "placement is not contiguous"
        return cls(topo, topo.world_size, 0, tuple(edges), tuple(devices), topo.flat,
                   next_client, tuple(roles))

    def role(self, rank: int) -> Role:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside topology '{self.topology.name}' "
                             f"(world size {self.world_size})")
        return self.roles[rank]

    def check_world_size(self, size: int) -> None:
        """Fail with one line when the job was started with the wrong number of ranks."""
        if size != self.world_size:
            raise HierfedError(f"{self.topology.source}: needs {self.topology.arithmetic()}, "
                               f"but the job has {size} ranks (use mpiexec -n {self.world_size})")

    def summary(self) -> str:
        return f"{self.topology.name}: {self.topology.arithmetic()}, {_plural(self.num_clients, 'client')}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
