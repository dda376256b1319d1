"""`hierfed run [TOPOLOGY] [options]`: one federated fine-tuning job.

    hierfed run                          # default topology + embedded defaults; launches mpiexec itself
    mpiexec -n 7 hierfed run topologies/default.yaml --config run.yaml --rounds 4

Started outside MPI it checks everything first (`prepare`), then re-runs itself under mpiexec with
the topology's world size; under an MPI launcher every rank prepares the same way, builds its
communicators and runs its role's loop.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hierfed.errors import HierfedError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `hierfed run` (also parsed by `hierfed launch` for what it passes on)."""
    p.add_argument("topology", nargs="?", help="topology file or name in ./topologies (default: the run config's, else 'default')")
    p.add_argument("--config", help="run config YAML (default: the embedded defaults)")
    p.add_argument("--out", help="results directory (default: runs/<topology>-<time>)")
    p.add_argument("--rounds", type=int, help="cloud rounds (schedule.rounds)")
    p.add_argument("--tau1", type=int, help="local steps per edge round (schedule.tau1)")
    p.add_argument("--tau2", type=int, help="edge rounds per cloud round (schedule.tau2)")
    p.add_argument("--seed", type=int, help="run seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override any run-config field, e.g. --set train.lr=1e-3")
    p.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"), default=None,
                   help="continue the run in --out from its last checkpoint (its saved config.yaml); "
                        "'--resume auto': resume when --out has a checkpoint, else start fresh (Slurm requeue)")
    p.add_argument("--no-launch", action="store_true", help="do not start mpiexec when not under MPI (runs as a single rank)")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="run a federated fine-tuning job", description="Run a hierarchical federated fine-tuning job.")
    add_arguments(p)
    p.set_defaults(func=_run)


def parse_run_args(argv: list[str]) -> argparse.Namespace:
    """`hierfed run ARGV`'s arguments, parsed as `hierfed run` parses them."""
    p = argparse.ArgumentParser(prog="hierfed run")
    add_arguments(p)
    return p.parse_args(argv)


def overrides(args: argparse.Namespace) -> list[str]:
    """--set items, then the shortcut flags (JSON-quoted: a path like 'runs/x #1' stays a string)."""
    out = list(args.overrides)
    flags = (("rounds", "schedule.rounds"), ("tau1", "schedule.tau1"), ("tau2", "schedule.tau2"), ("seed", "seed"), ("out", "out"), ("topology", "topology"))
    for flag, key in flags:
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={json.dumps(value)}")
    return out


def prepare(args: argparse.Namespace):
    """Everything every rank checks identically before any message is sent: config, topology, data."""
    from hierfed.cluster.preflight import check_deadline, check_edge_clients, check_resolved_split, check_supported
    from hierfed.config import dump_config, load_config, resumed_config
    from hierfed.data import load_data
    from hierfed.topology import load_topology

    cfg = load_config(args.config, overrides(args))
    if args.resume:  # continue the saved run: its config.yaml, with only harmless changes (hierfed.config.RESUME_MAY_CHANGE)
        if not cfg.out:
            raise HierfedError("--resume needs --out DIR: the run to continue")
        out_dir: str = cfg.out
        if args.resume == "auto":
            # Decided here, identically on every rank: a checkpoint appears only after a round
            # that needs every rank, so no rank can see one that another did not.
            args.resume = "yes" if (Path(out_dir) / "checkpoints" / "latest").is_file() else None
    if args.resume:
        assert cfg.out  # checked above: --resume without --out was refused
        cfg = resumed_config(Path(cfg.out) / "config.yaml", args.config, overrides(args))
    placement = load_topology(cfg.topology).placement()
    check_supported(placement, cfg)
    if cfg.model.source == "path":
        assert cfg.model.path is not None  # ModelConfig requires it with source=path
        if not Path(cfg.model.path).is_dir():
            raise HierfedError(f"model.path: {cfg.model.path} is not a directory")
    task = load_data(cfg.data)  # bad data paths and formats fail here, once, not on every rank mid-run
    if task.train[0].messages is not None:  # instruction data: the tokenizer's chat template must split prompt/response
        from hierfed.model import load_tokenizer
        from hierfed.training.instruct import render

        render(load_tokenizer(cfg.model), task.train[0].messages)
    check_edge_clients(placement, cfg, task)
    check_deadline(placement, cfg, task)
    if any(d.split_layers is not None for d in placement.devices):
        from hierfed.placement.plan import split_plan

        # memory budgets and k, checked once; then what the resolved k leave each edge to do
        check_resolved_split(placement, cfg, split_plan(placement, cfg, task.kind, task.num_labels))
    text = dump_config(cfg)  # as asked: a privacy budget may cut the rounds below
    from hierfed.privacy import budget

    cfg, _ = budget(cfg, placement)  # refuses a target ε exceeded at round 1; else stops before the round that would exceed it
    return cfg, placement, text


def _default_out(placement) -> str:
    return f"runs/{placement.topology.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _run(args: argparse.Namespace) -> int:
    from hierfed.cluster.mpi import launch, under_mpi

    if not under_mpi() and not args.no_launch:
        cfg, placement, _ = prepare(args)  # bad input fails here, before any rank starts
        argv = sys.argv[1:]
        if not cfg.out:
            out = _default_out(placement)
            return launch(placement.world_size, argv + ["--out", out], Path(out) / "ranks.json")
        return launch(placement.world_size, argv, Path(cfg.out) / "ranks.json")

    from mpi4py import MPI

    from hierfed.runtime.failure import guarded, report_once
    from hierfed.runtime.world import build_runtime

    world = MPI.COMM_WORLD
    try:
        if os.environ.get("HIERFED_INJECT_FAILURE") == f"preflight:{world.Get_rank()}":  # test hook: one rank's pre-flight fails
            raise HierfedError(f"model.path: /nonexistent-on-rank-{world.Get_rank()} is not a directory")
        cfg, placement, text = prepare(args)
        placement.check_world_size(world.Get_size())
        error: tuple[str, int] | None = None
    except HierfedError as e:
        error = (str(e), e.exit_code)
    except Exception as e:  # noqa: BLE001 - an unexpected pre-flight failure must not leave the others waiting
        error = (f"{type(e).__name__}: {e}".splitlines()[0], 1)
    # Agree collectively before any communicator is built: a rank that failed alone (a path missing
    # on its node) would otherwise exit while every other rank waits forever in COMM_WORLD.Split.
    gathered = world.allgather((error, os.getpid(), socket.gethostname()))
    failed = [(r, e) for r, (e, _, _) in enumerate(gathered) if e is not None]
    if failed:
        if len(failed) == world.Get_size() and len({e for _, e in failed}) == 1:
            report_once(failed[0][1][0])  # the same on every rank (bad input): one line from one rank
        elif world.Get_rank() == failed[0][0]:
            others = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
            print(f"hierfed: error: rank {failed[0][0]}{others}: {failed[0][1][0]}", file=sys.stderr, flush=True)
        return max(e[1] for _, e in failed)
    role = placement.role(MPI.COMM_WORLD.Get_rank())
    out = cfg.out or _default_out(placement)
    if role.kind == "cloud":  # who is who: the launcher names a rank that dies by it (MPICH reports only a pid)
        table = [{"rank": r, "role": placement.role(r).name, "host": host, "pid": pid} for r, (_, pid, host) in enumerate(gathered)]
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "ranks.json").write_text(json.dumps(table, indent=1) + "\n")

    def body() -> None:
        from hierfed.roles import run_role

        rt = build_runtime(placement, cfg.runtime.wait, cfg.runtime.threads, out, args.resume, text)
        if os.environ.get("HIERFED_INJECT_FAILURE") == role.name:  # test hook: failure handling
            raise RuntimeError("injected failure")
        run_role(rt, cfg)

    guarded(role.name, body)
    return 0
