"""`hierfed` commands. Thin: parse, build, run, close.

    hierfed run                          # default topology + embedded defaults; launches mpiexec itself
    mpiexec -n 7 hierfed run topologies/default.yaml --config run.yaml --rounds 4
    hierfed topology validate|ranks|show FILE
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from hierfed import __version__
from hierfed.commands import launch as launch_cmd
from hierfed.commands import sweep as sweep_cmd
from hierfed.commands import topology as topology_cmd
from hierfed.errors import HierfedError


def _add_run(subparsers) -> None:
    p = subparsers.add_parser("run", help="run a federated fine-tuning job", description="Run a hierarchical federated fine-tuning job.")
    p.add_argument("topology", nargs="?", help="topology file or name in ./topologies (default: the run config's, else 'default')")
    p.add_argument("--config", help="run config YAML (default: the embedded defaults)")
    p.add_argument("--out", help="results directory (default: runs/<topology>-<time>)")
    p.add_argument("--rounds", type=int, help="cloud rounds (schedule.rounds)")
    p.add_argument("--tau1", type=int, help="local steps per edge round (schedule.tau1)")
    p.add_argument("--tau2", type=int, help="edge rounds per cloud round (schedule.tau2)")
    p.add_argument("--seed", type=int, help="run seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override any run-config field, e.g. --set train.lr=1e-3")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-launch", action="store_true", help="do not start mpiexec when not under MPI (runs as a single rank)")
    p.set_defaults(func=_run)


def _overrides(args: argparse.Namespace) -> list[str]:
    """--set items, then the shortcut flags (JSON-quoted: a path like 'runs/x #1' stays a string)."""
    out = list(args.overrides)
    for flag, key in (("rounds", "schedule.rounds"), ("tau1", "schedule.tau1"), ("tau2", "schedule.tau2"), ("seed", "seed"), ("out", "out"), ("topology", "topology")):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={json.dumps(value)}")
    return out


def _prepare(args: argparse.Namespace):
    """Everything every rank checks identically before any message is sent: config, topology, data."""
    from hierfed.config import dump_config, load_config
    from hierfed.data import load_data
    from hierfed.preflight import check_edge_clients, check_resolved_split, check_supported
    from hierfed.topology import load_topology

    cfg = load_config(args.config, _overrides(args))
    placement = load_topology(cfg.topology).placement()
    check_supported(placement, cfg)
    if cfg.model.source == "path" and not Path(cfg.model.path).is_dir():
        raise HierfedError(f"model.path: {cfg.model.path} is not a directory")
    task = load_data(cfg.data)  # bad data paths and formats fail here, once, not on every rank mid-run
    check_edge_clients(placement, cfg, task)
    if any(d.split_layers is not None for d in placement.devices):
        from hierfed.splitlink import split_plan

        # memory budgets and k, checked once; then what the resolved k leave each edge to do
        check_resolved_split(placement, cfg, split_plan(placement, cfg, task.kind, task.num_labels))
    if args.resume and not cfg.out:
        raise HierfedError("--resume needs --out DIR: the run to continue")
    return cfg, placement, dump_config(cfg)


def _run(args: argparse.Namespace) -> int:
    from hierfed.launch import launch, under_mpi

    if not under_mpi() and not args.no_launch:
        cfg, placement, _ = _prepare(args)  # bad input fails here, before any rank starts
        argv = sys.argv[1:]
        if not cfg.out:
            out = f"runs/{placement.topology.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            argv += ["--out", out]
        return launch(placement.world_size, argv)

    from mpi4py import MPI

    from hierfed.runtime import build_runtime, guarded, report_once

    try:
        cfg, placement, text = _prepare(args)
        placement.check_world_size(MPI.COMM_WORLD.Get_size())
    except HierfedError as e:  # the same on every rank: one line from one rank, all exit 2
        report_once(str(e))
        return e.exit_code
    role = placement.role(MPI.COMM_WORLD.Get_rank())
    out = cfg.out or f"runs/{placement.topology.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    def body() -> None:
        from hierfed.roles import run_role

        rt = build_runtime(placement, cfg.runtime.wait, cfg.runtime.threads, out, args.resume, text)
        if os.environ.get("HIERFED_INJECT_FAILURE") == role.name:  # test hook: failure handling
            raise RuntimeError("injected failure")
        run_role(rt, cfg)

    guarded(role.name, body)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hierfed", description="Hierarchical cloud-edge-device federated fine-tuning over MPI.")
    parser.add_argument("--version", action="version", version=f"hierfed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{run,launch,sweep,topology}", required=True)
    _add_run(sub)
    launch_cmd.add_parser(sub)
    sweep_cmd.add_parser(sub)
    topology_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HierfedError as e:
        print(f"hierfed: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
