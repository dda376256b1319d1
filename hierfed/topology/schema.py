"""Topology files: the YAML schema, its validation and loading (pure: no MPI, no torch).

A topology YAML says how many cloud/edge/device ranks a job has and how they are linked;
`parse_topology` checks it once and returns a `Topology` (hierfed.topology.placement), every
problem as a one-line HierfedError that names the file and the field.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator

from hierfed.errors import HierfedError
from hierfed.topology.placement import (
    DEFAULT_LINKS,
    DEFAULT_MEMORY_GB,
    DEFAULT_SPEED,
    Behaviour,
    DeviceGroup,
    EdgeGroup,
    LinkModel,
    Topology,
)
from hierfed.validation import KnownFields, first_error, show

DEFAULT_DIR = "topologies"
EMBEDDED_DEFAULT = Path(__file__).parent.parent / "defaults" / "topology.yaml"
# Larger than any MPI job hierfed is meant for, small enough that a Placement (a Role per rank) fits
# in memory; virtual clients cost nothing per client in a Placement (ranges), only 32-bit ids.
MAX_RANKS = 2**20
MAX_CLIENTS = 2**31 - 1


# ----------------------------------------------------------------------- YAML schema ---


class _Strict(KnownFields):
    model_config = ConfigDict(extra="forbid", strict=True)


def _positive() -> Any:
    return Field(default=None, gt=0, allow_inf_nan=False)


class _Link(_Strict):
    bandwidth_mbps: float | None = _positive()
    latency_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class _Links(_Strict):
    edge_cloud: _Link = _Link()
    device_edge: _Link = _Link()
    device_cloud: _Link = _Link()


class _Diurnal(_Strict):
    """A periodic availability pattern: availability x (1 - amplitude (1 - cos 2pi(t/period - phase))/2)."""

    period: float = Field(gt=0, allow_inf_nan=False)  # in cloud rounds
    amplitude: float = Field(default=1.0, ge=0, le=1, allow_inf_nan=False)  # 1: unavailable at the trough
    phase: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)  # fraction of a period at which it peaks


class _DeviceClass(_Strict):
    memory_gb: float | None = _positive()
    speed: float | None = _positive()  # relative to the reference device (sim.reference_tflops)
    tflops: float | None = _positive()  # absolute sustained training rate; wins over speed
    # behaviour (hierfed.sim.behaviour, docs/heterogeneity.md): probabilities in [0, 1]
    availability: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)  # reachable when sampled
    dropout: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)  # vanishes mid-round after starting
    diurnal: _Diurnal | None = None  # availability varying with the cloud round


class _Group(_DeviceClass):
    ranks: int = Field(default=1, ge=1)
    clients: int = Field(default=1, ge=1)
    device_class: str | None = Field(default=None, alias="class")
    split_layers: int | str | None = None
    link: _Link = _Link()

    @field_validator("split_layers", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        ok = v is None or v in ("all", "auto") or (type(v) is int and v >= 1)
        if not ok:
            raise ValueError(f"must be an integer >= 1, 'all', 'auto' or null (got {show(v)})")
        return None if v == "all" else v


class _Edge(_Strict):
    name: str | None = None
    ranks: int = Field(default=1, ge=1)
    memory_gb: float | None = _positive()  # of each edge rank (its GPU): checked by `topology plan`
    tflops: float | None = _positive()  # the edge's compute rate for the simulated clock
    link: _Link = _Link()
    devices: list[_Group] = Field(min_length=1)
    train_locally: bool = False


class _File(_Strict):
    name: str | None = None
    description: str = ""
    links: _Links = _Links()
    device_classes: dict[str, _DeviceClass] = {}
    edges: list[_Edge] | None = Field(default=None, min_length=1)
    devices: list[_Group] | None = Field(default=None, min_length=1)


# ------------------------------------------------------------------- loading + errors ---


def parse_topology(data: Any, source: str) -> Topology:
    """Validate an already-loaded YAML document; every problem is a one-line HierfedError."""
    if not isinstance(data, dict):
        got = "an empty file" if data is None else show(data)
        raise HierfedError(f"{source}: top level must be a mapping of topology fields (got {got})")
    try:
        f = _File.model_validate(data)
    except ValidationError as e:
        raise HierfedError(first_error(e, source)) from None

    def fail(path: str, why: str) -> HierfedError:
        return HierfedError(f"{source}: {path}: {why}")

    if (f.edges is None) == (f.devices is None):
        how = "both are given" if f.edges is not None else "neither is given"
        raise fail("edges/devices", f"give exactly one of 'edges' (hierarchical) or 'devices' (flat); {how}")

    def link(over: _Link, tier: str) -> LinkModel:
        # built-in default < links.<tier> < the group's or edge's own `link:`
        tier_link = getattr(f.links, tier).model_dump(exclude_none=True)
        return LinkModel(**(asdict(DEFAULT_LINKS[tier]) | tier_link | over.model_dump(exclude_none=True)))

    def group(g: _Group, path: str, tier: str) -> DeviceGroup:
        cls = _DeviceClass()
        if g.device_class is not None:
            if g.device_class not in f.device_classes:
                known = ", ".join(f.device_classes) or "none defined in device_classes"
                raise fail(f"{path}.class", f"unknown device class {g.device_class!r} (known: {known})")
            cls = f.device_classes[g.device_class]
        # inline value < device class < built-in default
        memory = next(v for v in (g.memory_gb, cls.memory_gb, DEFAULT_MEMORY_GB) if v is not None)
        speed = next(v for v in (g.speed, cls.speed, DEFAULT_SPEED) if v is not None)
        tflops = next((v for v in (g.tflops, cls.tflops) if v is not None), None)
        availability = next(v for v in (g.availability, cls.availability, 1.0) if v is not None)
        dropout = next(v for v in (g.dropout, cls.dropout, 0.0) if v is not None)
        diurnal = next((v for v in (g.diurnal, cls.diurnal) if v is not None), None)
        behaviour = Behaviour(availability, dropout, *((diurnal.period, diurnal.amplitude, diurnal.phase) if diurnal else (None, 0.0, 0.0)))
        return DeviceGroup(g.ranks, g.clients, g.device_class, memory, speed, g.split_layers,
                           link(g.link, tier), tflops, behaviour)

    edges: list[EdgeGroup] = []
    seen: set[str] = set()
    for i, edge_in in enumerate(f.edges or []):
        name = edge_in.name if edge_in.name is not None else f"edge{i}"
        if not name or "/" in name or len(name.split()) != 1 or name == "cloud":
            why = "must be a non-empty word without '/' or spaces, not 'cloud'"
            raise fail(f"edges[{i}].name", f"{why} (got {name!r})")
        if name in seen:
            raise fail(f"edges[{i}].name", f"duplicate edge name {name!r}")
        seen.add(name)
        groups = tuple(group(g, f"edges[{i}].devices[{j}]", "device_edge") for j, g in enumerate(edge_in.devices))
        edges.append(EdgeGroup(name, edge_in.ranks, link(edge_in.link, "edge_cloud"), groups, edge_in.train_locally, edge_in.memory_gb, edge_in.tflops))
    flat = tuple(group(g, f"devices[{j}]", "device_cloud") for j, g in enumerate(f.devices or []))
    name = f.name if f.name is not None else Path(source).stem
    topo = Topology(name, f.description.strip(), source, f.devices is not None, tuple(edges), flat)
    _check_size(topo)
    return topo


def _check_size(topo: Topology) -> None:
    """Refuse sizes no job can have, before a Placement materialises anything (sums only)."""
    if topo.world_size > MAX_RANKS:
        raise HierfedError(f"{topo.source}: {topo.world_size:,} ranks is more than hierfed places (at most {MAX_RANKS:,}: "
                           "every rank gets its own role and communicators)")
    if topo.num_clients > MAX_CLIENTS:
        raise HierfedError(f"{topo.source}: {topo.num_clients:,} clients is more than client ids allow (at most {MAX_CLIENTS:,})")


def load_topology(spec: str | Path) -> Topology:
    """Load a topology from a YAML path, or a bare name looked up as ./topologies/<name>.yaml.

    The name "default" falls back to the copy embedded in the package, so `hierfed run` works
    from any directory.
    """
    text = str(spec)
    if not text.strip():
        raise HierfedError("topology: empty name; give a topology name or a path to a .yaml file")
    looks_like_path = (isinstance(spec, Path) or any(c in text for c in "/\\")
                       or text.endswith((".yaml", ".yml")) or Path(text).is_file())
    if looks_like_path:
        return _load_file(Path(spec), text)
    path = Path(DEFAULT_DIR) / f"{text}.yaml"
    if path.is_file():
        return _load_file(path, str(path))
    if text == "default":
        return _load_file(EMBEDDED_DEFAULT, str(EMBEDDED_DEFAULT))
    names = sorted({p.stem for p in Path(DEFAULT_DIR).glob("*.yaml")} | {"default"})
    raise HierfedError(f"unknown topology {text!r}: tried {path} in {Path.cwd()} (not found); "
                       f"known names here: {', '.join(names)}; or give a path to a .yaml file")


def _load_file(path: Path, source: str) -> Topology:
    if not path.exists():
        raise HierfedError(f"{source}: no such topology file")
    if not path.is_file():
        raise HierfedError(f"{source}: not a file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise HierfedError(f"{source}: invalid YAML{where}: {e.problem or e.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise HierfedError(f"{source}: cannot read YAML: {' '.join(str(e).split())}") from None
    return parse_topology(data, source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (plain PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in keys:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            keys.add(key)
        return super().construct_mapping(node, deep=deep)
