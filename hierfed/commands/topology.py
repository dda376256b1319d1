"""`hierfed topology validate|ranks|show FILE`: check a topology file and see its rank layout."""

from __future__ import annotations

import argparse
from typing import Any

from hierfed.topology import DeviceSpec, Placement, load_topology


def add_parser(subparsers: Any) -> None:
    """Register `topology` and its sub-commands on the main CLI's subparsers object."""
    p = subparsers.add_parser("topology", help="validate a topology file and show its rank layout",
                              description="Validate a topology file and show its rank layout.")
    sub = p.add_subparsers(dest="topology_command", metavar="{validate,ranks,show}", required=True)
    for name, func, help_ in (
        ("validate", _validate, "check the file; print 'ok: <summary>'"),
        ("ranks", _ranks, "print the number of MPI ranks it needs (for mpiexec -n)"),
        ("show", _show, "print the cloud/edge/device tree with rank numbers, clients and links"),
    ):
        c = sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
        c.add_argument("file", metavar="FILE",
                       help="a topology .yaml file, or a name in ./topologies/ (e.g. default, flat)")
        c.set_defaults(func=func)


def _validate(args: argparse.Namespace) -> int:
    print(f"ok: {load_topology(args.file).placement().summary()}")
    return 0


def _ranks(args: argparse.Namespace) -> int:
    print(load_topology(args.file).world_size)
    return 0


def _show(args: argparse.Namespace) -> int:
    print("\n".join(render_tree(load_topology(args.file).placement())))
    return 0


def render_tree(p: Placement) -> list[str]:
    """The placement as text lines: summary, then cloud ─ edges ─ devices with ranks and links."""
    rows: list[tuple[str, str, tuple[str, ...]]] = [("cloud", "rank 0", ())]  # label, rank, details
    if p.flat:
        rows += [(f"{_branch(i, len(p.devices))}{d.name}", f"rank {d.rank}", _device(d, "cloud"))
                 for i, d in enumerate(p.devices)]
    for i, e in enumerate(p.edges):
        ranks = f"rank {e.leader}" if len(e.ranks) == 1 else f"ranks {e.ranks[0]}-{e.ranks[-1]}"
        rows.append((f"{_branch(i, len(p.edges))}{e.name}", ranks, (f"↔ cloud {e.link}",)))
        indent = "   " if i == len(p.edges) - 1 else "│  "
        rows += [(f"{indent}{_branch(j, len(e.devices))}{d.name}", f"rank {d.rank}", _device(d, "edge"))
                 for j, d in enumerate(e.devices)]
    # align the label and rank columns everywhere, and the device columns among device rows
    w_label = max(len(r[0]) for r in rows) + 2
    w_rank = max(len(r[1]) for r in rows) + 2
    dev = [r[2] for r in rows if len(r[2]) > 1]
    w_cols = [max(len(c[k]) for c in dev) + 2 for k in range(len(dev[0]) - 1)] if dev else []
    lines = [p.summary()] + ([f"  {p.topology.description}"] if p.topology.description else [])
    for label, ranks, details in rows:
        cells = "".join(f"{c:<{w}}" for c, w in zip(details[:-1], w_cols)) + "".join(details[-1:])
        lines.append(f"{label:<{w_label}}{ranks:<{w_rank}}{cells}".rstrip())
    return lines


def _branch(i: int, n: int) -> str:
    return "└─ " if i == n - 1 else "├─ "


def _clients(ids: tuple[int, ...]) -> str:
    if len(ids) == 1:
        return f"clients {ids[0]}"
    return f"clients {ids[0]}-{ids[-1]} ({len(ids)})"


def _device(d: DeviceSpec, parent: str) -> tuple[str, ...]:
    """Columns: clients, resources (memory, speed, class, split point), link to the parent."""
    res = [f"{d.memory_gb:g} GB", f"×{_speed(d.speed)}"]
    res += [d.device_class] if d.device_class else []
    res += [f"split {d.split_layers}"] if d.split_layers is not None else []
    return _clients(d.clients), " ".join(res), f"↔ {parent} {d.link}"


def _speed(x: float) -> str:
    s = f"{x:g}"
    return s if any(c in s for c in ".e") else s + ".0"
