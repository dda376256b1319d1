"""What a run used: every rank's peak memory, gathered into the cloud's summary.json at the end."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hierfed.comm.channel import wait
from hierfed.runtime.world import Runtime
from hierfed.topology import Role


def peak_memory() -> tuple[int, int]:
    """(host, gpu) peak bytes of this process so far: its resident-set high-water mark (getrusage's
    ru_maxrss: KiB on Linux, bytes on macOS) and torch's peak CUDA allocation (-1 when it used no GPU).

    ru_maxrss also covers what the process was before its exec (the launcher's small proxy), never
    less than this process's own peak."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    host = rss if sys.platform == "darwin" else rss * 1024
    torch = sys.modules.get("torch")  # never imported just to ask (an edge that only aggregates has not)
    gpu = -1
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        # the GPU this rank used need not be the current one: the largest peak over the GPUs it sees
        gpu = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    return host, gpu


def report_memory(rt: Runtime) -> None:
    """Every rank's peak memory into the cloud's summary.json (`peak_memory`, by role name; the
    other ranks of a multi-rank edge as "edge0#1", ...), at the end of a run. Collective over
    COMM_WORLD: every rank calls it once, after its role's loop."""
    world = MPI.COMM_WORLD
    mine = np.array(peak_memory(), dtype=np.int64)
    cloud = rt.role.kind == "cloud"
    every = np.empty((world.Get_size(), 2), dtype=np.int64) if cloud else None
    wait(world.Igather(mine, every, root=rt.placement.cloud_rank), rt.poll)
    path = Path(rt.out) / "summary.json"
    if not cloud or not path.exists():
        return
    assert every is not None  # the cloud gathered into it
    summary = json.loads(path.read_text())

    def key(role: Role) -> str:  # the ranks of a multi-rank edge after its leader: "edge0#1", ...
        return role.name if role.group_index == 0 else f"{role.name}#{role.group_index}"

    summary["peak_memory"] = {key(rt.placement.role(r)): {"host": int(h) if h >= 0 else None, "gpu": int(g) if g >= 0 else None}
                              for r, (h, g) in enumerate(every)}
    path.write_text(json.dumps(summary, indent=2) + "\n")
    rt.summary = summary
