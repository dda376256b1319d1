"""The MPI side of a run: communicators built once from the Placement, and failure handling.

Communicators (each split once from COMM_WORLD, the parent is rank 0 in each):
  cloud_comm      the cloud + every edge leader (flat topologies: the cloud + every device)
  edge_comm[e]    edge e's leader + its device ranks
  edge_group[e]   edge e's own ranks (a DeepSpeed group when an edge spans several ranks)
  split_comm      a duplicate of COMM_WORLD for split devices' activations and gradients (tagged p2p)
How each rank waits for messages (`runtime.wait`: block or poll) is decided here too, per node.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpi4py import MPI

from hierfed.comm.channel import Channel
from hierfed.comm.ledger import Ledger
from hierfed.topology import Placement, Role


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
    when_all_ranks_done: Callable[[], None] | None = None  # run after the end-of-run gather (the cloud confirms its last checkpoint)


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
    assert role.edge is not None or not (in_edge_comm or role.kind == "edge")  # edges and a hierarchy's devices have one
    edge = undefined if role.edge is None else role.edge
    edge_comm = world.Split(edge if in_edge_comm else undefined, key=0 if is_leader else 1 + world.Get_rank())
    edge_group = world.Split(edge if role.kind == "edge" else undefined, key=role.group_index)

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
