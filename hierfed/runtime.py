"""The MPI side of a run: communicators built once from the Placement, and failure handling.

Communicators (each split once from COMM_WORLD, the parent is rank 0 in each):
  cloud_comm      the cloud + every edge leader (flat topologies: the cloud + every device)
  edge_comm[e]    edge e's leader + its device ranks
  edge_group[e]   edge e's own ranks (a DeepSpeed group when an edge spans several ranks)
  split_comm      a duplicate of COMM_WORLD for split devices' activations and gradients (tagged p2p)
A failure on any rank prints one line naming the rank and its role, then aborts the whole job, so
no rank is left waiting in a collective.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from hierfed.comm.channel import Channel
from hierfed.comm.ledger import Ledger
from hierfed.errors import HierfedError
from hierfed.topology import Placement, Role

# The rank that prints an error every rank found identically (bad input found before any message
# is exchanged). This is about not printing a message N times, not about roles.
REPORTING_RANK = 0


@dataclass
class Runtime:
    """What a role loop is given: its Role, its channels up and down, and the run's context."""

    placement: Placement
    role: Role
    ledger: Ledger
    up: Channel | None  # to the parent (None at the cloud)
    down: Channel | None  # to the children (None at devices)
    edge_group: MPI.Comm | None  # the ranks of this rank's edge (edge ranks only)
    split_comm: MPI.Comm  # point-to-point traffic across split devices' cuts (a duplicate of COMM_WORLD)
    out: str
    resume: bool
    config_text: str
    poll: bool = True  # how this rank waits (runtime.wait resolved for its node)
    wait_reason: str = ""  # how ranks wait, every node's choice
    summary: dict[str, Any] = field(default_factory=dict)


def peak_memory() -> tuple[int, int]:
    """(host, gpu) peak bytes of this process so far: its resident-set high-water mark (VmHWM;
    -1 where /proc does not exist) and torch's peak CUDA allocation (-1 when it used no GPU)."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        host = int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        host = -1
    torch = sys.modules.get("torch")  # never imported just to ask (an edge that only aggregates has not)
    used = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    # the GPU this rank used need not be the current one: the largest peak over the GPUs it sees
    gpu = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) if used else -1
    return host, gpu


def report_memory(rt: Runtime) -> None:
    """Every rank's peak memory into the cloud's summary.json (`peak_memory`, by role name; the
    other ranks of a multi-rank edge as "edge0#1", ...), at the end of a run. Collective over
    COMM_WORLD: every rank calls it once, after its role's loop."""
    from hierfed.comm.channel import wait

    world = MPI.COMM_WORLD
    mine = np.array(peak_memory(), dtype=np.int64)
    cloud = rt.role.kind == "cloud"
    every = np.empty((world.Get_size(), 2), dtype=np.int64) if cloud else None
    wait(world.Igather(mine, every, root=rt.placement.cloud_rank), rt.poll)
    path = Path(rt.out) / "summary.json"
    if not cloud or not path.exists():
        return
    summary = json.loads(path.read_text())

    def key(role: Role) -> str:  # the ranks of a multi-rank edge after its leader: "edge0#1", ...
        return role.name if role.group_index == 0 else f"{role.name}#{role.group_index}"

    summary["peak_memory"] = {key(rt.placement.role(r)): {"host": int(h) if h >= 0 else None, "gpu": int(g) if g >= 0 else None}
                              for r, (h, g) in enumerate(every)}
    path.write_text(json.dumps(summary, indent=2) + "\n")
    rt.summary = summary


def choose_wait(mode: str, ranks_per_node: int, cores_per_node: int, threads: int) -> tuple[bool, str]:
    """(poll, why) for runtime.wait. Blocking waits spin inside MPI: right when every rank has its
    own cores (and the only way some MPI transports keep a large message moving, see
    docs/design.md), wrong when ranks outnumber cores (the spinning ranks steal the cores of the
    ranks that compute). `ranks_per_node` and `cores_per_node` are this rank's node's."""
    need = ranks_per_node * threads
    fits = need <= cores_per_node
    where = f"{ranks_per_node} ranks x {threads} thread{'s' if threads > 1 else ''} on {cores_per_node} cores"
    if mode == "auto":
        return (not fits, f"{'block' if fits else 'poll'} (auto: {where})")
    return (mode == "poll", f"{mode} (set; {where})")


def cpu_quota(cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Cores a CPU quota allows this process (cgroup v2 cpu.max, or v1 cfs quota), None if unlimited:
    a container limited with --cpus sees every host CPU in its affinity mask."""
    root = Path(cgroup)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1") or int(period) <= 0:
        return None
    return max(1, -(-int(quota) // int(period)))


def node_load(world: MPI.Comm) -> tuple[int, int]:
    """(ranks, usable cores) of this rank's node: cores are the union of its ranks' CPU affinity
    sets (a launcher that binds ranks to cores is seen as such), capped by a CPU quota. Collective
    over `world`; ranks on different nodes may see different loads (waiting is a per-rank choice)."""
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        cpus = set().union(*node.allgather(mine))
        return node.Get_size(), min(len(cpus), cpu_quota() or len(cpus))
    finally:
        node.Free()


def build_runtime(placement: Placement, wait: str, threads: int, out: str, resume: bool, config_text: str) -> Runtime:
    world = MPI.COMM_WORLD
    poll, wait_reason = choose_wait(wait, *node_load(world), threads)
    wait_reason = "; ".join(sorted(set(world.allgather(wait_reason))))  # every node's choice, for the summary
    role = placement.role(world.Get_rank())
    undefined = MPI.UNDEFINED
    is_leader = role.kind == "edge" and role.group_index == 0

    if placement.flat:
        in_cloud_comm = role.kind in ("cloud", "device")
    else:
        in_cloud_comm = role.kind == "cloud" or is_leader
    cloud_comm = world.Split(0 if in_cloud_comm else undefined, key=world.Get_rank())

    in_edge_comm = is_leader or (role.kind == "device" and not placement.flat)
    edge_comm = world.Split(role.edge if in_edge_comm else undefined, key=0 if is_leader else 1 + world.Get_rank())
    edge_group = world.Split(role.edge if role.kind == "edge" else undefined, key=role.group_index)

    ledger = Ledger()
    up = down = None
    if role.kind == "cloud":
        down = Channel(cloud_comm, "device-cloud" if placement.flat else "edge-cloud", ledger, poll, is_parent=True)
    elif is_leader:
        up = Channel(cloud_comm, "edge-cloud", ledger, poll, is_parent=False)
        down = Channel(edge_comm, "device-edge", ledger, poll, is_parent=True)
    elif role.kind == "device":
        link, comm = ("device-cloud", cloud_comm) if placement.flat else ("device-edge", edge_comm)
        up = Channel(comm, link, ledger, poll, is_parent=False)
    split_comm = world.Dup()
    group = None if edge_group == MPI.COMM_NULL else edge_group
    return Runtime(placement, role, ledger, up, down, group, split_comm, out, resume, config_text, poll, wait_reason)


def report_once(message: str) -> None:
    """Print an error every rank found identically, from one rank only."""
    if MPI.COMM_WORLD.Get_rank() == REPORTING_RANK:
        print(f"hierfed: error: {message}", file=sys.stderr, flush=True)


def guarded(role_name: str, body: Callable[[], None]) -> None:
    """Run a rank's work; on any exception print one line and abort every rank of the job."""
    try:
        body()
    except BaseException as e:  # noqa: BLE001 - every failure must end the whole job
        rank = MPI.COMM_WORLD.Get_rank()
        if isinstance(e, HierfedError):
            line = str(e)
        elif isinstance(e, KeyboardInterrupt):
            line = "interrupted"
        else:
            line = f"{type(e).__name__}: {e}".splitlines()[0]
        print(f"hierfed: error: rank {rank} ({role_name}): {line}", file=sys.stderr, flush=True)
        if os.environ.get("HIERFED_DEBUG"):
            traceback.print_exc()
        MPI.COMM_WORLD.Abort(getattr(e, "exit_code", 1))
