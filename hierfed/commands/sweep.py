"""`hierfed sweep [SPEC]`: run a grid of jobs one after another (or one point per Slurm array task),
then write results.csv, summary.md and plots.

    hierfed sweep launch/sweeps/fanout.yaml                # every unfinished point, then the report
    hierfed sweep --config run.yaml --axis topology=fanout-1x8,flat-8 --axis schedule.tau1=2,5
    hierfed sweep SPEC --list                              # the points, their ranks and status
    hierfed sweep SPEC --point 3                           # one point (a Slurm array task)
    hierfed sweep SPEC --report                            # only the CSV, summary and plots
    hierfed sweep SPEC --print count|max-ranks|pending     # numbers for slurm/sweep.sh
"""

from __future__ import annotations

import argparse
from typing import Any

from hierfed.errors import HierfedError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("sweep", help="run a grid of jobs and compare them (CSV, summary, plots)",
                              description="Run a grid of jobs (topologies, tau1, tau2, codecs, any run-config field); "
                                          "finished points are skipped on a re-run.")
    p.add_argument("spec", nargs="?", metavar="SPEC", help="sweep spec YAML (see launch/sweeps/); optional with --axis")
    p.add_argument("--config", help="base run config (overrides the spec's `config`)")
    p.add_argument("--axis", action="append", default=[], metavar="KEY=V1,V2",
                   help="add a grid axis, e.g. --axis schedule.tau1=2,5 (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config field for every point")
    p.add_argument("--name", help="sweep name (default: the spec's, else its file name)")
    p.add_argument("--out", help="sweep directory (default: the spec's `out`, else sweeps/<name>)")
    p.add_argument("--launcher", choices=("auto", "mpiexec", "srun"), default="auto",
                   help="auto (default): srun inside a Slurm allocation, else mpiexec")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--list", action="store_true", help="list the points and their status; run nothing")
    g.add_argument("--point", type=int, metavar="I", help="run only point I (0-based; a Slurm array task id)")
    g.add_argument("--report", action="store_true", help="only write results.csv, summary.md and the plots")
    g.add_argument("--print", dest="show", choices=("count", "max-ranks", "pending"),
                   help="print the number of points, the largest world size, or the unfinished points' indices")
    p.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    from hierfed.experiments.report import report
    from hierfed.experiments.sweep import load_sweep, plan, run_point, status

    if not args.spec and not args.axis:
        raise HierfedError("sweep: give a spec file or at least one --axis KEY=V1,V2")
    sweep = load_sweep(args.spec, args.out, args.overrides, args.axis, args.config, args.name)
    resolved = plan(sweep)  # validates every point before anything runs
    if args.show == "count":
        print(len(resolved))
        return 0
    if args.show == "max-ranks":
        print(max(r.placement.world_size for r in resolved))
        return 0
    if args.show == "pending":
        print(",".join(str(r.point.index) for r in resolved if status(r) != "done"))
        return 0
    if args.list:
        for r in resolved:
            print(f"{r.point.index:>3}  {status(r):<8} {r.placement.world_size:>3} ranks  {r.point.label}")
        return 0
    if args.point is not None:
        if not 0 <= args.point < len(resolved):
            raise HierfedError(f"sweep {sweep.name}: --point {args.point}: the sweep has points 0-{len(resolved) - 1}")
        return 0 if run_point(resolved[args.point], args.launcher, len(resolved)) else 1
    failed = []
    if not args.report:
        print(f"hierfed: sweep {sweep.name}: {len(resolved)} points in {sweep.out}", flush=True)
        failed = [r.point.label for r in resolved if not run_point(r, args.launcher, len(resolved))]
    files = report(sweep, resolved)
    print(f"hierfed: wrote {', '.join(str(f) for f in files)}")
    if failed:
        print(f"hierfed: {len(failed)} point(s) failed: {'; '.join(failed)} (re-run to retry them)")
        return 1
    return 0
