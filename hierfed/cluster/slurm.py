"""Inside a Slurm allocation: its hosts and task counts (SLURM_* variables, node lists expanded),
and a check of its size, or of its heterogeneous components, against the topology before anything
starts."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from hierfed.cluster.hosts import Host
from hierfed.errors import HierfedError

if TYPE_CHECKING:
    from hierfed.topology import Placement


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


def in_slurm(env: Mapping[str, str] | None = None) -> bool:
    """Inside a Slurm allocation (a batch script, salloc, or an array task)."""
    return "SLURM_JOB_ID" in (os.environ if env is None else env)


def slurm_hosts(env: Mapping[str, str] | None = None) -> list[Host]:
    """The allocation's nodes and their task slots (SLURM_JOB_NODELIST, SLURM_TASKS_PER_NODE)."""
    env = os.environ if env is None else env
    names = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
    tasks = expand_tasks_per_node(env.get("SLURM_TASKS_PER_NODE", ",".join("1" * len(names))))
    if not names or len(names) != len(tasks):
        raise HierfedError(f"cannot read the Slurm allocation: nodes {names}, tasks per node {tasks}")
    return [Host(n, t) for n, t in zip(names, tasks)]


def slurm_tasks(env: Mapping[str, str] | None = None) -> list[int]:
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
