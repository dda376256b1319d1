"""Test helper: start a probe on every rank exactly as `hierfed launch` would start hierfed, and
print `rank node` per rank (node = the Slurm node, or the MPI node id outside Slurm).

    python tests/slurm/probe.py TOPOLOGY LAUNCHER [HOSTS]    # e.g. fanout-2x4 srun
"""

import sys
import tempfile
from pathlib import Path

from hierfed.cluster.hosts import parse_hosts
from hierfed.cluster.jobs import plan_job, run_job
from hierfed.topology import load_topology

RANK = r"""
import os
from mpi4py import MPI
w = MPI.COMM_WORLD
node = os.environ.get("SLURMD_NODENAME")
if node is None:  # outside Slurm: ranks that MPICH put on one node share a communicator
    node = "node%d" % min(w.Split_type(MPI.COMM_TYPE_SHARED).allgather(w.Get_rank()))
rows = w.gather((w.Get_rank(), node), root=0)
if w.Get_rank() == 0:
    print("\n".join("%d %s" % r for r in sorted(rows)), flush=True)
"""

topology, launcher = sys.argv[1], sys.argv[2]
hosts = parse_hosts(sys.argv[3]) if len(sys.argv) > 3 else None
placement = load_topology(topology).placement()
with tempfile.TemporaryDirectory() as d:
    job = plan_job(placement, [], Path(d), launcher, hosts, program=[sys.executable, "-c", RANK])
    print("# " + job.describe(), flush=True)
    sys.exit(run_job(job, Path(d)))
