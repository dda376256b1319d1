"""Starting hierfed under MPI: detecting an MPI launch, finding mpiexec, building its command line.

`hierfed run` started by hand (not under MPI) re-runs itself as `mpiexec -n <world size> python -m
hierfed run ...`, with the world size read from the topology. MPICH (the `mpich` wheel or a site
MPICH) runs any number of ranks on any number of cores as is; Open MPI needs --oversubscribe when
ranks outnumber cores, and --allow-run-as-root when started as root (containers, CI).

`hierfed launch` and `hierfed sweep` start jobs on clusters with the rest of this package: host maps
(hosts.py), Slurm allocations (slurm.py) and the launch command of a job (jobs.py). See docs/launch.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from hierfed.errors import HierfedError

if TYPE_CHECKING:
    pass

# Variables that MPICH/Hydra, Open MPI, PMIx and Slurm's srun set in every rank they start.
_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")


def under_mpi() -> bool:
    """True when this process was started by an MPI launcher (mpiexec, mpirun, srun --mpi=...)."""
    return any(v in os.environ for v in _MPI_ENV)


def find_mpiexec() -> str:
    """The mpiexec beside this Python first (a venv with the mpich wheel), then the one on PATH."""
    env = os.environ.get("HIERFED_MPIEXEC")
    if env:
        return env
    for name in ("mpiexec", "mpirun"):
        here = Path(sys.executable).parent / name
        if here.exists():
            return str(here)
    for name in ("mpiexec", "mpirun"):
        found = shutil.which(name)
        if found:
            return found
    raise HierfedError("no mpiexec found: install the 'mpich' wheel (pip install mpich) or load your site MPI")


@cache
def mpi_flavor(mpiexec: str) -> str:
    """'openmpi', 'mpich' or 'unknown', from `mpiexec --version`."""
    try:
        text = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if "Open MPI" in text or "OpenRTE" in text or "open-mpi" in text:
        return "openmpi"
    if "HYDRA" in text or "MPICH" in text or "Intel" in text:
        return "mpich"
    return "unknown"


def mpiexec_command(nprocs: int, argv: list[str], mpiexec: str | None = None) -> list[str]:
    """The full command that runs `python -m hierfed <argv>` on `nprocs` ranks."""
    mpiexec = mpiexec or find_mpiexec()
    cmd = [mpiexec, "-n", str(nprocs)]
    if mpi_flavor(mpiexec) == "openmpi":
        cmd += ["--oversubscribe"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd += ["--allow-run-as-root"]
    return cmd + [sys.executable, "-m", "hierfed", *argv]


def rank_env() -> dict[str, str]:
    """Environment for the ranks: one BLAS/OpenMP thread each (ranks usually outnumber cores)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def launch(nprocs: int, argv: list[str]) -> int:
    """Run hierfed under mpiexec and return its exit code (forwarding Ctrl-C to the job)."""
    cmd = mpiexec_command(nprocs, argv)
    print(f"hierfed: launching {nprocs} ranks: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}", flush=True)
    proc = subprocess.Popen(cmd, env=rank_env())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def entry(argv: list[str]) -> list[str]:
    """`python -m mpi4py -m hierfed ARGV`: mpi4py's runner calls MPI_Abort on an exception that
    escapes anywhere on any rank (even at import), so no rank is left waiting in a collective."""
    return [sys.executable, "-m", "mpi4py", "-m", "hierfed", *argv]
