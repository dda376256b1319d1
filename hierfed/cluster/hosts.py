"""Hosts and the rank-to-host map: each edge stays with its devices on one host, written as a host
file for MPICH, Open MPI or srun."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hierfed.errors import HierfedError

if TYPE_CHECKING:
    from hierfed.topology import Placement


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def parse_hosts(spec: str) -> list[Host]:
    """`a:8,b:8` (slots after the colon; a bare name is one slot; repeated names add up, in order)."""
    return _merge(_host_item(item, "--hosts") for item in spec.split(",") if item.strip())


def read_hostfile(path: str | Path) -> list[Host]:
    """A host file in MPICH (`host:8`), Open MPI (`host slots=8`) or plain (`host`, one slot) form."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise HierfedError(f"{path}: cannot read host file ({e.strerror})") from None
    items = []
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)(\s+.*)?", line)
        items.append(Host(m.group(1), int(m.group(2))) if m else _host_item(line, f"{path}:{n}"))
    return _merge(items)


def _host_item(item: str, where: str) -> Host:
    name, sep, slots = item.strip().partition(":")
    if not name or (sep and not slots.isdigit()) or (sep and int(slots) < 1):
        raise HierfedError(f"{where}: {item.strip()!r}: expected HOST or HOST:SLOTS with SLOTS >= 1")
    return Host(name, int(slots) if sep else 1)


def _merge(items) -> list[Host]:
    slots: dict[str, int] = {}
    for h in items:
        slots[h.name] = slots.get(h.name, 0) + h.slots
    if not slots:
        raise HierfedError("no hosts given")
    return [Host(n, s) for n, s in slots.items()]


def blocks(p: Placement) -> list[tuple[str, range]]:
    """Ranks that belong on one host: the cloud, then each edge with its devices (flat: each device)."""
    out = [("cloud", range(0, 1))]
    if p.flat:
        return out + [(d.name, range(d.rank, d.rank + 1)) for d in p.devices]
    for e in p.edges:
        ranks = list(e.ranks) + list(e.device_ranks)
        out.append((e.name, range(min(ranks), max(ranks) + 1)))  # contiguous by construction
    return out


def map_ranks(p: Placement, hosts: list[Host], policy: str = "edge") -> list[str]:
    """The host of every rank. Hosts are filled in order, each taking a contiguous range of ranks.

    edge:  an edge and its devices never straddle two hosts: when the next edge does not fit in
           what is left of a host, it starts on the next host.
    block: rank after rank, as mpiexec places them by default.
    """
    if sum(h.slots for h in hosts) < p.world_size:
        raise HierfedError(f"{p.topology.source}: needs {p.world_size} ranks but the hosts have "
                           f"{sum(h.slots for h in hosts)} slots ({_show(hosts)})")
    units = blocks(p) if policy == "edge" else [(f"rank {r}", range(r, r + 1)) for r in range(p.world_size)]
    out: list[str] = []
    i, free = 0, hosts[0].slots
    for name, ranks in units:
        while len(ranks) > free:
            i += 1
            if i == len(hosts):
                raise HierfedError(
                    f"{p.topology.source}: cannot keep {name} ({len(ranks)} ranks, {ranks.start}-{ranks.stop - 1}) "
                    f"on one host: the hosts left have too few free slots ({_show(hosts)}); "
                    f"give hosts with more slots, or --map block to let edges straddle hosts")
            free = hosts[i].slots
        out += [hosts[i].name] * len(ranks)
        free -= len(ranks)
    return out


def runs(hostmap: list[str]) -> list[tuple[str, int]]:
    """Consecutive ranks on the same host: [(host, count), ...] in rank order."""
    out: list[tuple[str, int]] = []
    for h in hostmap:
        if out and out[-1][0] == h:
            out[-1] = (h, out[-1][1] + 1)
        else:
            out.append((h, 1))
    return out


def hostfile_text(hostmap: list[str], flavor: str) -> str:
    """A host file that gives exactly `hostmap`: hosts in rank order, each with its rank count
    (MPICH/Hydra `host:n`; Open MPI `host slots=n`, filled by slot; srun: one line per rank)."""
    if flavor == "srun":
        return "".join(f"{h}\n" for h in hostmap)
    fmt = "{} slots={}\n" if flavor == "openmpi" else "{}:{}\n"
    return "".join(fmt.format(h, n) for h, n in runs(hostmap))


def _show(hosts: list[Host]) -> str:
    return ", ".join(f"{h.name}:{h.slots}" for h in hosts)
