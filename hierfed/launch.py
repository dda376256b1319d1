"""Starting hierfed under MPI: detecting an MPI launch, finding mpiexec, building its command line.

`hierfed run` started by hand (not under MPI) re-runs itself as `mpiexec -n <world size> python -m
hierfed run ...`, with the world size read from the topology. MPICH (the `mpich` wheel or a site
MPICH) runs any number of ranks on any number of cores as is; Open MPI needs --oversubscribe when
ranks outnumber cores, and --allow-run-as-root when started as root (containers, CI).

`hierfed launch` and `hierfed sweep` (second half of this file) start jobs on clusters: a rank-to-host
map that keeps each edge with its devices on one host, written as a host file for MPICH, Open MPI
or srun; inside a Slurm allocation, a check of its size (or of its heterogeneous components)
against the topology before anything starts. See docs/launch.md.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from hierfed.errors import HierfedError

if TYPE_CHECKING:
    from hierfed.topology import Placement

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


@lru_cache(maxsize=None)
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


# ------------------------------------------------------------------ cluster launches ---
# `hierfed launch` and `hierfed sweep`: the same job on several hosts, under mpiexec (MPICH or Open
# MPI, with a host file that keeps each edge with its devices on one host) or under Slurm's srun.

def entry(argv: list[str]) -> list[str]:
    """`python -m mpi4py -m hierfed ARGV`: mpi4py's runner calls MPI_Abort on an exception that
    escapes anywhere on any rank (even at import), so no rank is left waiting in a collective."""
    return [sys.executable, "-m", "mpi4py", "-m", "hierfed", *argv]


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def parse_hosts(spec: str) -> list[Host]:
    """`a:8,b:8` (slots after the colon; a bare name is one slot; repeated names add up, in order)."""
    return _merge(_host_item(item, "--hosts") for item in spec.split(",") if item.strip())


def read_hostfile(path: str | Path) -> list[Host]:
    """A host file in MPICH (`host:8`), Open MPI (`host slots=8`) or plain (`host`, one slot) form."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise HierfedError(f"{path}: cannot read host file ({e.strerror})") from None
    items = []
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)(\s+.*)?", line)
        items.append(Host(m.group(1), int(m.group(2))) if m else _host_item(line, f"{path}:{n}"))
    return _merge(items)


def _host_item(item: str, where: str) -> Host:
    name, sep, slots = item.strip().partition(":")
    if not name or (sep and not slots.isdigit()) or (sep and int(slots) < 1):
        raise HierfedError(f"{where}: {item.strip()!r}: expected HOST or HOST:SLOTS with SLOTS >= 1")
    return Host(name, int(slots) if sep else 1)


def _merge(items) -> list[Host]:
    slots: dict[str, int] = {}
    for h in items:
        slots[h.name] = slots.get(h.name, 0) + h.slots
    if not slots:
        raise HierfedError("no hosts given")
    return [Host(n, s) for n, s in slots.items()]


def expand_nodelist(text: str) -> list[str]:
    """Slurm's compressed host list, `gpu[01-03,07],cpu1` -> gpu01 gpu02 gpu03 gpu07 cpu1."""
    out: list[str] = []
    for item in re.findall(r"(?:[^,\[]+|\[[^\]]*\])+", text):
        names = [""]
        for part in re.findall(r"\[[^\]]*\]|[^\[]+", item):
            if not part.startswith("["):
                names = [n + part for n in names]
                continue
            choices = []
            for r in part[1:-1].split(","):
                lo, _, hi = r.partition("-")
                choices += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi or lo) + 1)]
            names = [n + c for n in names for c in choices]
        out += names
    return out


def expand_tasks_per_node(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE, `2(x3),1` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise HierfedError(f"SLURM_TASKS_PER_NODE: cannot read {text!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def in_slurm(env: dict[str, str] | None = None) -> bool:
    """Inside a Slurm allocation (a batch script, salloc, or an array task)."""
    return "SLURM_JOB_ID" in (os.environ if env is None else env)


def slurm_hosts(env: dict[str, str] | None = None) -> list[Host]:
    """The allocation's nodes and their task slots (SLURM_JOB_NODELIST, SLURM_TASKS_PER_NODE)."""
    env = os.environ if env is None else env
    names = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
    tasks = expand_tasks_per_node(env.get("SLURM_TASKS_PER_NODE", ",".join("1" * len(names))))
    if not names or len(names) != len(tasks):
        raise HierfedError(f"cannot read the Slurm allocation: nodes {names}, tasks per node {tasks}")
    return [Host(n, t) for n, t in zip(names, tasks)]


def slurm_tasks(env: dict[str, str] | None = None) -> list[int]:
    """Tasks per component of the allocation: [n] for a plain job, one entry per het component."""
    env = os.environ if env is None else env
    het = env.get("SLURM_HET_SIZE")
    if het:
        return [int(env.get(f"SLURM_NTASKS_HET_GROUP_{i}", "0")) for i in range(int(het))]
    if env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS"):
        return [int(env.get("SLURM_NTASKS") or env["SLURM_NPROCS"])]
    return [sum(h.slots for h in slurm_hosts(env))]


def het_sizes(p: Placement) -> list[int]:
    """The components of the heterogeneous layout, in rank order: cloud, then per edge its edge ranks
    and its device ranks (flat: cloud, devices). Slurm numbers ranks component by component, so these
    components give exactly the topology's rank order."""
    if p.flat:
        return [1, len(p.devices)]
    return [1] + [n for e in p.edges for n in (len(e.ranks), len(e.devices))]


def check_allocation(p: Placement, env: dict[str, str] | None = None, exact: bool = True) -> None:
    """Fail with one line when the Slurm allocation does not fit the topology."""
    tasks = slurm_tasks(env)
    src, need = p.topology.source, p.topology.arithmetic()
    if len(tasks) > 1:
        want = het_sizes(p)
        if tasks != want:
            raise HierfedError(f"{src}: needs {need}, as {len(want)} heterogeneous components of "
                               f"{' : '.join(map(str, want))} tasks (cloud, then each edge and its devices), but "
                               f"the allocation has {len(tasks)} components of {' : '.join(map(str, tasks))} tasks; "
                               f"submit with `bash slurm/hetjob.sh`, which sizes the components")
        return
    if tasks[0] == p.world_size:
        return
    # More tasks than ranks is fine for a sweep point, and across nodes, where keeping each edge
    # whole on a node can leave slots free; on one node it means the job was sized wrongly.
    if tasks[0] > p.world_size and (not exact or len(slurm_hosts(env)) > 1):
        return
    raise HierfedError(f"{src}: needs {need}, but the Slurm allocation has {tasks[0]} tasks (SLURM_NTASKS); "
                       f"submit with --ntasks={p.world_size}")


def blocks(p: Placement) -> list[tuple[str, range]]:
    """Ranks that belong on one host: the cloud, then each edge with its devices (flat: each device)."""
    out = [("cloud", range(0, 1))]
    if p.flat:
        return out + [(d.name, range(d.rank, d.rank + 1)) for d in p.devices]
    for e in p.edges:
        ranks = list(e.ranks) + list(e.device_ranks)
        out.append((e.name, range(min(ranks), max(ranks) + 1)))  # contiguous by construction
    return out


def map_ranks(p: Placement, hosts: list[Host], policy: str = "edge") -> list[str]:
    """The host of every rank. Hosts are filled in order, each taking a contiguous range of ranks.

    edge:  an edge and its devices never straddle two hosts: when the next edge does not fit in
           what is left of a host, it starts on the next host.
    block: rank after rank, as mpiexec places them by default.
    """
    if sum(h.slots for h in hosts) < p.world_size:
        raise HierfedError(f"{p.topology.source}: needs {p.world_size} ranks but the hosts have "
                           f"{sum(h.slots for h in hosts)} slots ({_show(hosts)})")
    units = blocks(p) if policy == "edge" else [(f"rank {r}", range(r, r + 1)) for r in range(p.world_size)]
    out: list[str] = []
    i, free = 0, hosts[0].slots
    for name, ranks in units:
        while len(ranks) > free:
            i += 1
            if i == len(hosts):
                raise HierfedError(
                    f"{p.topology.source}: cannot keep {name} ({len(ranks)} ranks, {ranks.start}-{ranks.stop - 1}) "
                    f"on one host: the hosts left have too few free slots ({_show(hosts)}); "
                    f"give hosts with more slots, or --map block to let edges straddle hosts")
            free = hosts[i].slots
        out += [hosts[i].name] * len(ranks)
        free -= len(ranks)
    return out


def runs(hostmap: list[str]) -> list[tuple[str, int]]:
    """Consecutive ranks on the same host: [(host, count), ...] in rank order."""
    out: list[tuple[str, int]] = []
    for h in hostmap:
        if out and out[-1][0] == h:
            out[-1] = (h, out[-1][1] + 1)
        else:
            out.append((h, 1))
    return out


def hostfile_text(hostmap: list[str], flavor: str) -> str:
    """A host file that gives exactly `hostmap`: hosts in rank order, each with its rank count
    (MPICH/Hydra `host:n`; Open MPI `host slots=n`, filled by slot; srun: one line per rank)."""
    if flavor == "srun":
        return "".join(f"{h}\n" for h in hostmap)
    fmt = "{} slots={}\n" if flavor == "openmpi" else "{}:{}\n"
    return "".join(fmt.format(h, n) for h, n in runs(hostmap))


def _show(hosts: list[Host]) -> str:
    return ", ".join(f"{h.name}:{h.slots}" for h in hosts)


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
