"""`hierfed launch [options] [--] RUN-ARGS`: run `hierfed run RUN-ARGS` on a cluster.

    hierfed launch --hosts node1:16,node2:16 -- fanout-2x4 --config run.yaml   # mpiexec + host file
    hierfed launch --hostfile hosts.txt -- default --rounds 4
    hierfed launch -- default                      # inside sbatch/salloc: srun over the allocation
    hierfed launch --dry-run --hosts a:6,b:6 -- fanout-2x4   # print the command and the rank map
    hierfed launch --print world|het-sizes -- zero-edges      # numbers for batch scripts
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "launch", help="run a job on a cluster: mpiexec with a host map, or srun inside Slurm",
        description="Run `hierfed run RUN-ARGS` with the world size from the topology: under mpiexec "
                    "(MPICH or Open MPI; a host file keeps each edge with its devices on one host) or, "
                    "inside a Slurm allocation, under srun after checking the allocation's size.",
        epilog="Everything after the launch options (or after `--`) is passed to `hierfed run`.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--hosts", metavar="H:N,...", help="hosts and their slots, e.g. node1:16,node2:16")
    g.add_argument("--hostfile", metavar="FILE", help="MPICH (host:N), Open MPI (host slots=N) or plain host file")
    p.add_argument("--map", choices=("edge", "block"), default="edge",
                   help="edge (default): each edge with its devices on one host; block: fill hosts rank by rank")
    p.add_argument("--launcher", choices=("auto", "mpiexec", "srun"), default="auto",
                   help="auto (default): srun inside a Slurm allocation, else mpiexec")
    p.add_argument("--mpiexec", metavar="PATH", help="the mpiexec/mpirun to use (default: beside python, then PATH)")
    p.add_argument("--srun-mpi", metavar="TYPE",
                   help="srun --mpi plugin (default: $HIERFED_SRUN_MPI, else pmi2, which MPICH speaks; pmix for a PMIx Open MPI)")
    p.add_argument("--dry-run", action="store_true", help="print the command and rank map; start nothing")
    p.add_argument("--print", dest="show", choices=("world", "het-sizes"),
                   help="print the world size, or the heterogeneous components' task counts, and exit")
    p.add_argument("run_args", nargs=argparse.REMAINDER, metavar="RUN-ARGS", help="arguments of `hierfed run`")
    p.set_defaults(func=_launch)


def _launch(args: argparse.Namespace) -> int:
    from hierfed.cluster.hosts import parse_hosts, read_hostfile
    from hierfed.cluster.jobs import plan_job, run_job
    from hierfed.cluster.slurm import het_sizes
    from hierfed.commands.run import overrides, parse_run_args, prepare
    from hierfed.config import load_config
    from hierfed.topology import load_topology

    run_argv = args.run_args[1:] if args.run_args[:1] == ["--"] else list(args.run_args)
    run = parse_run_args(run_argv)
    if args.show or args.dry_run:  # the topology is all these need: no data, no support checks
        cfg = load_config(run.config, overrides(run))
        placement = load_topology(cfg.topology).placement()
    else:
        cfg, placement, _ = prepare(run)  # bad input fails here, before anything starts
    if args.show == "world":
        print(placement.world_size)
        return 0
    if args.show == "het-sizes":
        print(" ".join(str(n) for n in het_sizes(placement)))
        return 0
    hosts = parse_hosts(args.hosts) if args.hosts else read_hostfile(args.hostfile) if args.hostfile else None
    out = cfg.out or f"runs/{placement.topology.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    argv = ["run", *run_argv] + ([] if cfg.out else ["--out", out])
    jobdir = Path(out) / "launch"
    job = plan_job(placement, argv, jobdir, args.launcher, hosts, args.map, args.mpiexec, srun_mpi=args.srun_mpi)
    print(f"hierfed: {placement.summary()}", flush=True)
    print(f"hierfed: {job.describe()}", flush=True)
    if args.dry_run:
        for name, text in job.files.items():
            print(f"--- {jobdir / name}\n{text}", end="")
        return 0
    code = run_job(job, jobdir)
    if code:
        print(f"hierfed: the job exited with status {code}", file=sys.stderr)
    return code
