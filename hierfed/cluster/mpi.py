"""Starting hierfed under MPI: detecting an MPI launch, finding mpiexec, building its command line.

`hierfed run` started by hand (not under MPI) re-runs itself as `mpiexec -n <world size> python -m
hierfed run ...`, with the world size read from the topology. MPICH (the `mpich` wheel or a site
MPICH) runs any number of ranks on any number of cores as is; Open MPI needs --oversubscribe when
ranks outnumber cores, and --allow-run-as-root when started as root (containers, CI).

`hierfed launch` and `hierfed sweep` start jobs on clusters with the rest of this package: host maps
(hosts.py), Slurm allocations (slurm.py) and the launch command of a job (jobs.py). See docs/launch.md.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
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


# MPICH's choice of algorithm for MPI_Ireduce, read at MPI_Init. Its automatic choice for a large
# commutative sum (reduce-scatter + gather, in stages that each wait for a rank's progress) made
# hierfed's aggregation 1.4-1.6x the blocking collectives at D = 1M on 7 ranks on 2 cores; the
# pipelined tree brings it to 0.86-0.88x (BENCHMARKS.md, "Aggregation"). A tree sums in its own
# fixed order: runs stay deterministic, and bits differ from the default's only where a parent has
# 3 or more children. Set only for MPICH 4 or later (where `tsp_tree` exists: MPICH aborts at
# MPI_Init on a value it does not know), never over a value already in the environment.
MPICH_TUNING = {"MPIR_CVAR_IREDUCE_INTRA_ALGORITHM": "tsp_tree"}


@cache
def mpi_library() -> str:
    """The first line of MPI_Get_library_version() of the MPI that mpi4py loads in this Python (so
    in the ranks), read in a child process without initialising MPI; '' when it cannot be read."""
    code = ("import mpi4py; mpi4py.rc.initialize = mpi4py.rc.finalize = False; from mpi4py import MPI; "
            "print(MPI.Get_library_version().splitlines()[0])")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def mpich_tuning(library: str) -> dict[str, str]:
    """MPICH_TUNING for MPICH 4 or later (`library`: mpi_library()), else nothing (Open MPI, Intel
    MPI, Cray MPICH, MVAPICH and older MPICH keep their own choices)."""
    m = re.match(r"MPICH Version:\s*(\d+)\.", library)
    return dict(MPICH_TUNING) if m and int(m.group(1)) >= 4 else {}


def rank_env() -> dict[str, str]:
    """Environment for the ranks: one BLAS/OpenMP thread each (ranks usually outnumber cores), and
    on MPICH 4+ its tree algorithm for the non-blocking reduce every aggregation uses (MPICH_TUNING)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    for var, value in mpich_tuning(mpi_library()).items():
        env.setdefault(var, value)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def launch(nprocs: int, argv: list[str], ranks_file: Path | None = None) -> int:
    """Run hierfed under mpiexec and return its exit code (forwarding Ctrl-C to the job).

    A rank that dies without a word (SIGKILL, the OOM killer) makes mpiexec end the others, but its
    report cannot say which rank it was: MPICH names the pid of whichever process it reaped first,
    often one it killed itself. So the launcher watches the ranks of this host (the cloud writes the
    rank → role, host, pid table `ranks_file` at start) and, when the job fails, names the rank that
    ended first. Open MPI's own report names the rank; it is passed on as is."""
    cmd = mpiexec_command(nprocs, argv)
    print(f"hierfed: launching {nprocs} ranks: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}", flush=True)
    if ranks_file is not None:
        ranks_file.unlink(missing_ok=True)  # a table left by an earlier run names other processes
    proc = subprocess.Popen(cmd, env=rank_env())
    watch = _FirstToEnd(ranks_file, proc) if ranks_file is not None else None
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
    # hierfed's own failures exit 1 or 2 and have printed their line; any other code is a rank that
    # died without one (mpiexec passes on its signal number, e.g. 9 for SIGKILL)
    if code not in (0, 1, 2) and watch is not None and (first := watch.result()):
        who = ", ".join(f"rank {r['rank']} ({r['role']}, pid {r['pid']} on node {r['host']})" for r in first)
        what = "was the first rank to end" if len(first) == 1 else "were the first ranks to end (seen together)"
        print(f"hierfed: error: {who} {what}; mpiexec then ended the others and exited with code {code}", file=sys.stderr, flush=True)
    return code


class _FirstToEnd:
    """Which rank of this host ended first: a thread waits for the rank table, opens a pidfd per
    local rank (Linux; the ranks are not our children, so this is how to be told of their end) and
    blocks until the first one ends. The kernel wakes it at that exit, before mpiexec has noticed
    and killed the rest (several process hops later); ranks seen ended in the same wake-up are all
    named."""

    def __init__(self, ranks_file: Path, job: subprocess.Popen) -> None:
        self._file, self._job = ranks_file, job
        self._first: list[dict] = []
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def result(self) -> list[dict]:
        self._thread.join(timeout=2)
        return self._first

    def _watch(self) -> None:
        if not hasattr(os, "pidfd_open"):
            return
        ranks: list[dict] = []
        while self._job.poll() is None and not ranks:
            time.sleep(0.2)
            ranks = _read_ranks(self._file)
        host = socket.gethostname()
        fds: dict[int, dict] = {}
        for r in ranks:
            if r.get("host") == host:
                try:
                    fds[os.pidfd_open(int(r["pid"]))] = r
                except OSError:  # already gone: it ended before we looked
                    self._first.append(r)
        if self._first or not fds:
            return
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        try:
            ready = poller.poll()
            self._first = sorted((fds[fd] for fd, _ in ready), key=lambda r: int(r["rank"]))
        finally:
            for fd in fds:
                os.close(fd)


def _read_ranks(path: Path) -> list[dict]:
    try:
        return list(json.loads(path.read_text()))
    except (OSError, ValueError):
        return []


def entry(argv: list[str]) -> list[str]:
    """`python -m mpi4py -m hierfed ARGV`: mpi4py's runner calls MPI_Abort on an exception that
    escapes anywhere on any rank (even at import), so no rank is left waiting in a collective."""
    return [sys.executable, "-m", "mpi4py", "-m", "hierfed", *argv]
