"""A job on a cluster: the launch command (mpiexec with a host file, or srun), planned from the
topology and the hosts, then started and waited for."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hierfed.cluster.hosts import Host, hostfile_text, map_ranks, runs
from hierfed.cluster.mpi import entry, find_mpiexec, mpi_flavor, rank_env
from hierfed.cluster.slurm import check_allocation, in_slurm, slurm_hosts, slurm_tasks
from hierfed.errors import HierfedError

if TYPE_CHECKING:
    from hierfed.topology import Placement


def cluster_command(nprocs: int, argv: list[str], launcher: str, hostfile: str | None = None,
                    mpiexec: str | None = None, het_groups: int = 0, srun_mpi: str = "pmi2",
                    program: list[str] | None = None) -> list[str]:
    """The command that runs `hierfed ARGV` (or `program`) on `nprocs` ranks, via mpi4py's runner.

    srun:    --mpi=pmi2 (the wire-up MPICH speaks); a host file makes the distribution arbitrary
             (SLURM_HOSTFILE, set by the caller); a heterogeneous job runs all its components.
    mpiexec: MPICH takes `-f hostfile`; Open MPI `--hostfile` with `--map-by slot`, plus
             --oversubscribe (more ranks than cores is normal here) and --allow-run-as-root as root.
    """
    if launcher == "srun":
        cmd = ["srun", f"--mpi={srun_mpi}", "--kill-on-bad-exit=1"]
        if het_groups > 1:
            cmd.append(f"--het-group=0-{het_groups - 1}")
        else:
            cmd.append(f"--ntasks={nprocs}")
            if hostfile:
                cmd.append("--distribution=arbitrary")
        return cmd + (program or entry(argv))
    mpiexec = mpiexec or find_mpiexec()
    cmd = [mpiexec, "-n", str(nprocs)]
    if mpi_flavor(mpiexec) == "openmpi":
        cmd += ["--oversubscribe"] + (["--allow-run-as-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])
        cmd += ["--hostfile", hostfile, "--map-by", "slot"] if hostfile else []
    elif hostfile:
        cmd += ["-f", hostfile]
    return cmd + (program or entry(argv))


def resolve_launcher(name: str) -> str:
    """auto: srun inside a Slurm allocation (when srun is installed), else mpiexec."""
    if name == "auto":
        return "srun" if in_slurm() and shutil.which("srun") else "mpiexec"
    return name


@dataclass
class Job:
    """A planned launch: the command, its environment additions and the rank-to-host map."""

    launcher: str
    nprocs: int
    cmd: list[str]
    env: dict[str, str]
    hostmap: list[str] | None  # None: the launcher's own placement (one host, or Slurm's block)
    files: dict[str, str]  # written into the job's directory before it starts
    unset: tuple[str, ...] = ()  # environment variables the launcher must not see

    def describe(self) -> str:
        where = ""
        if self.hostmap:
            spans, rank = [], 0
            for h, n in runs(self.hostmap):
                spans.append(f"{h} {rank}-{rank + n - 1}" if n > 1 else f"{h} {rank}")
                rank += n
            where = f" (ranks on hosts: {', '.join(spans)})"
        shown = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(self.cmd))
        return f"launching {self.nprocs} ranks with {self.launcher}{where}: {shown}"


def plan_job(p: Placement, argv: list[str], jobdir: Path, launcher: str = "auto", hosts: list[Host] | None = None,
             policy: str = "edge", mpiexec: str | None = None, exact: bool = True, srun_mpi: str | None = None,
             program: list[str] | None = None) -> Job:
    """Everything needed to start `hierfed ARGV` for placement `p`; checks a Slurm allocation first.

    Inside an allocation without --hosts, the allocation's nodes are the hosts (mapped when there
    are several); a heterogeneous allocation runs as one srun over all its components.
    """
    launcher = resolve_launcher(launcher)
    srun_mpi = srun_mpi or os.environ.get("HIERFED_SRUN_MPI", "pmi2")
    het = 0
    if in_slurm() and hosts is None:
        check_allocation(p, exact=exact)
        het = len(slurm_tasks()) if len(slurm_tasks()) > 1 else 0
        if not het:
            hosts = slurm_hosts()
            hosts = hosts if len(hosts) > 1 else None
    elif launcher == "srun" and not in_slurm():
        raise HierfedError("--launcher srun needs a Slurm allocation (sbatch, salloc, or `bash slurm/job.sh`)")
    if het and launcher != "srun":
        raise HierfedError("a heterogeneous Slurm job starts its ranks with srun (--launcher srun or auto)")
    hostmap = map_ranks(p, hosts, policy) if hosts else None
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    unset: tuple[str, ...] = ()
    hostfile = None
    if hostmap:
        flavor = "srun" if launcher == "srun" else mpi_flavor(mpiexec or find_mpiexec())
        hostfile = str(jobdir / "hostfile")
        files["hostfile"] = hostfile_text(hostmap, flavor)
        if launcher == "srun":
            env["SLURM_HOSTFILE"] = hostfile
            unset = ("SLURM_NTASKS_PER_NODE",)  # srun warns that it conflicts with the host file
    roles = [p.role(r) for r in range(p.world_size)]
    files["ranks.tsv"] = "rank\trole\tname\thost\n" + "".join(
        f"{r.rank}\t{r.kind}\t{r.name}\t{hostmap[r.rank] if hostmap else '-'}\n" for r in roles)
    cmd = cluster_command(p.world_size, argv, launcher, hostfile, mpiexec, het, srun_mpi, program)
    return Job(launcher, p.world_size, cmd, env, hostmap, files, unset)


def run_job(job: Job, jobdir: Path, log: Path | None = None) -> int:
    """Write the job's files, start it, wait; its output goes to `log` when given, else inherited."""
    jobdir.mkdir(parents=True, exist_ok=True)
    for name, text in job.files.items():
        (jobdir / name).write_text(text)
    env = {k: v for k, v in (rank_env() | job.env).items() if k not in job.unset}
    with open(log, "w") if log else open(os.devnull) as sink:
        proc = subprocess.Popen(job.cmd, env=env, stdout=sink if log else None, stderr=subprocess.STDOUT if log else None)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            return proc.wait()
