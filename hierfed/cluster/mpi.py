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


def launch(nprocs: int, argv: list[str], ranks_file: Path | None = None) -> int:
    """Run hierfed under mpiexec and return its exit code (forwarding Ctrl-C to the job).

    The job's output is relayed unchanged. When the job fails, the launcher's own report (MPICH
    names only the PID of a process that died; Open MPI the rank) is matched against `ranks_file`,
    the rank → role, host, pid table that rank 0 writes at start, so one line names the rank that
    died and its role."""
    cmd = mpiexec_command(nprocs, argv)
    print(f"hierfed: launching {nprocs} ranks: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}", flush=True)
    proc = subprocess.Popen(cmd, env=rank_env(), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    tail = b""
    try:
        while chunk := proc.stdout.read1(1 << 16):  # type: ignore[attr-defined]
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            tail = (tail + chunk)[-(1 << 16):]
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
    if code != 0 and ranks_file is not None:
        for line in dead_ranks(tail.decode(errors="replace"), _read_ranks(ranks_file)):
            print(f"hierfed: error: {line}", file=sys.stderr, flush=True)
    return code


def _read_ranks(path: Path) -> list[dict]:
    try:
        return list(json.loads(path.read_text()))
    except (OSError, ValueError):
        return []


_MPICH_DEATH = re.compile(r"PID (\d+) RUNNING AT (\S+)\s*\n=\s*EXIT CODE: (\d+)")
_MPICH_EXIT_STRING = re.compile(r"EXIT STRING: (.+?)\s*$", re.M)
_OPENMPI_DEATH = re.compile(r"process rank (\d+) with PID (\d+) on node (\S+) exited on signal (\d+)")


def dead_ranks(output: str, ranks: list[dict]) -> list[str]:
    """Lines naming each rank that the launcher's report says died, e.g. 'rank 4 (edge1/d0, pid
    22092 on node vm) ended: Killed (signal 9)'. `ranks` is the table rank 0 writes at start
    ([{"rank", "role", "host", "pid"}]); a death it cannot place is reported by pid alone."""
    by_pid = {(int(r["pid"]), str(r["host"])): r for r in ranks}
    by_rank = {int(r["rank"]): r for r in ranks}
    lines = []
    exit_string = _MPICH_EXIT_STRING.search(output)
    for pid, host, code in _MPICH_DEATH.findall(output):
        how = exit_string.group(1) if exit_string else f"exit code {code}"
        r = by_pid.get((int(pid), host))
        who = f"rank {r['rank']} ({r['role']}, pid {pid} on node {host})" if r else f"the process with pid {pid} on node {host}"
        lines.append(f"{who} ended: {how}; the launcher ended the other ranks")
    for rank, pid, host, sig in _OPENMPI_DEATH.findall(output):
        role = by_rank.get(int(rank), {}).get("role", "?")
        lines.append(f"rank {rank} ({role}, pid {pid} on node {host}) ended: killed by signal {sig}; the launcher ended the other ranks")
    return lines


def entry(argv: list[str]) -> list[str]:
    """`python -m mpi4py -m hierfed ARGV`: mpi4py's runner calls MPI_Abort on an exception that
    escapes anywhere on any rank (even at import), so no rank is left waiting in a collective."""
    return [sys.executable, "-m", "mpi4py", "-m", "hierfed", *argv]
