"""`hierfed topology validate|ranks|show|plan FILE`: check a topology file and see its rank layout.

`validate` also runs the checks `hierfed run` makes before launch (hierfed.cluster.preflight) against the
run config given by `--config` (default: the embedded defaults). `plan` (and `validate`, when the
file has `split_layers` or edges with `memory_gb`) prices each device's share of the model, and each
training edge's per rank, with hierfed.placement (memory, plan) for that config. Only those paths import torch:
validating a topology without them stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hierfed.topology import DeviceSpec, Placement, load_topology


def add_parser(subparsers: Any) -> None:
    """Register `topology` and its sub-commands on the main CLI's subparsers object."""
    p = subparsers.add_parser("topology", help="validate a topology file and show its rank layout",
                              description="Validate a topology file and show its rank layout.")
    sub = p.add_subparsers(dest="topology_command", metavar="{validate,ranks,show,plan}", required=True)
    for name, func, help_ in (
        ("validate", _validate, "check the file (and, with split_layers, the devices' memory budgets); "
                                "print 'ok: <summary>'"),
        ("ranks", _ranks, "print the number of MPI ranks it needs (for mpiexec -n)"),
        ("show", _show, "print the cloud/edge/device tree with rank numbers, clients and links"),
        ("plan", _plan, "print per device the split point k, estimated memory, link bytes per step and why"),
    ):
        c = sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
        c.add_argument("file", metavar="FILE",
                       help="a topology .yaml file, or a name in ./topologies/ (e.g. default, flat)")
        if name in ("validate", "plan"):
            c.add_argument("--config", metavar="RUN",
                           help="run config YAML whose model, peft, train and split settings are priced "
                                "(default: the embedded defaults)")
        c.set_defaults(func=func)


def _validate(args: argparse.Namespace) -> int:
    from hierfed.cluster.preflight import check_resolved_split, check_supported
    from hierfed.config import load_config

    placement = load_topology(args.file).placement()
    cfg = load_config(args.config)
    check_supported(placement, cfg)  # what `hierfed run` checks before launch
    split = [d for d in placement.devices if d.split_layers is not None]
    if not split and all(e.memory_gb is None for e in placement.edges):
        print(f"ok: {placement.summary()}")  # nothing to price: torch is not even imported
        return 0
    from hierfed.placement.memory import human, task_of
    from hierfed.placement.plan import split_plan

    if split:
        check_resolved_split(placement, cfg, split_plan(placement, cfg, *task_of(cfg)))
    _, device_rows, edge_rows = _rows(placement, args.config, edges=True)
    rows = {r.name: r for r in device_rows}
    for d in split:
        if not rows[d.name].fits:
            print(f"hierfed: warning: {d.name}: {rows[d.name].why}", file=sys.stderr)
    for e in edge_rows:
        if not e.fits:
            print(f"hierfed: warning: {e.name}: {e.trains} ({e.engine}) needs {human(e.per_rank.total)} per rank, "
                  f"more than its memory_gb {e.memory_gb:g}", file=sys.stderr)
    ks = ", ".join(f"{d.name} k={_k(rows[d.name].k)}" for d in split)
    print(f"ok: {placement.summary()}" + (f"; split: {ks}" if split else ""))
    return 0


def _plan(args: argparse.Namespace) -> int:
    placement = load_topology(args.file).placement()
    print("\n".join(render_plan(placement, args.config)))
    return 0


def _rows(placement: Placement, config: str | None, edges: bool = False) -> tuple[str, list[Any], list[Any]]:
    """hierfed.placement.plan's plan for this topology under the run config, a line of its factors, and
    (with `edges`) the training edges' memory per rank."""
    from hierfed.config import load_config
    from hierfed.placement import plan
    from hierfed.placement.memory import task_of

    cfg = load_config(config)
    kind, num_labels = task_of(cfg)
    rows = plan.plan(placement, cfg, kind, num_labels)  # raises HierfedError on impossible budgets
    edge_rows = plan.edge_plan(placement, cfg, kind, num_labels) if edges else []
    return plan.describe(cfg, kind, num_labels), rows, edge_rows


def _aligned(table: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells in columns as wide as their widest cell (the last column left ragged)."""
    widths = [max(len(row[i]) for row in table) + 2 for i in range(len(table[0]) - 1)]
    return ["".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + row[-1] for row in table]


def render_plan(placement: Placement, config: str | None) -> list[str]:
    """The plan as aligned text: the summary, the factors, one row per device, then one per
    training edge (its memory per rank, and on one rank without DeepSpeed)."""
    from hierfed.placement.memory import human

    factors, rows, edges = _rows(placement, config, edges=True)
    table: list[tuple[str, ...]] = [("device", "rank", "memory", "split", "k", "estimate", "up/step", "down/step", "why")]
    table += [(r.name, str(r.rank), f"{r.memory_gb:g} GB", "all" if r.requested is None else str(r.requested),
               _k(r.k), human(r.estimate.total), human(r.up), human(r.down), r.why) for r in rows]
    lines = [placement.summary(), f"  {factors}"] + _aligned(table)
    if edges:
        table = [("edge", "ranks", "memory", "per rank", "host/rank", "1 rank, plain", "engine", "trains")]
        table += [(e.name, str(e.ranks), "-" if e.memory_gb is None else f"{e.memory_gb:g} GB", human(e.per_rank.total),
                   human(e.host) if e.host else "-", human(e.single.total), e.engine,
                   e.trains + ("" if e.fits else f"; does not fit {e.memory_gb:g} GB per rank (warning)")) for e in edges]
        lines += [""] + _aligned(table)
    return lines


def _k(k: int | None) -> str:
    return "all" if k is None else str(k)


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
        own = (f"trains client {e.clients[0]} itself",) if e.clients else ()
        rows.append((f"{_branch(i, len(p.edges))}{e.name}", ranks, (*own, f"↔ cloud {e.link}")))
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


def _clients(ids: range) -> str:
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
