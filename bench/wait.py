"""How runtime.wait moves a large message whose receiver arrives late (see docs/design.md, Waiting).

    mpiexec -n 2 python bench/wait.py                       # the MPI the venv has (MPICH wheel here)
    mpiexec.openmpi --mca btl_vader_single_copy_mechanism none -n 2 python bench/wait.py   # Open MPI
                                                            # as in a container without ptrace

The pattern of every split micro-batch: rank 0 (a device) posts an Isend of N bytes and goes on
computing for 5 ms; rank 1 (the edge) has posted the Irecv but computes for 20 ms before it waits.
Each side then completes its request with hierfed's own wait (hierfed.comm.channel.wait) in `block`
mode (inside MPI) or `poll` mode (Test in a 100 µs spin, then a backoff sleep of 20 µs doubling to
1 ms). Printed: the median time from the start of each side's wait until its request completes,
and poll / block. A transport that copies large messages in fragments, and only while both sides
are in MPI, stretches the poll case to about one fragment per wake-up.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from mpi4py import MPI

from hierfed.comm.channel import wait


def compute(seconds: float) -> None:
    """Stand-in for a rank that is busy computing outside MPI."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def one(comm: MPI.Comm, buf: np.ndarray, poll: bool) -> float:
    """One late-receiver transfer; returns this rank's wait time."""
    comm.Barrier()
    if comm.Get_rank() == 0:
        request = comm.Isend(buf, dest=1, tag=7)
        compute(0.005)
    else:
        request = comm.Irecv(buf, source=0, tag=7)
        compute(0.020)
    started = time.perf_counter()
    wait(request, poll)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="65536,1048576,8388608", help="message sizes in bytes")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        raise SystemExit("bench/wait.py: run with exactly 2 ranks")
    rows = []
    for n in (int(float(x)) for x in args.sizes.split(",")):
        buf = np.ones(n, dtype=np.uint8)
        times: dict[str, list[float]] = {"block": [], "poll": []}
        one(comm, buf, False)  # warm-up
        for _ in range(args.repeats):
            for mode in ("block", "poll"):  # alternate, so load changes hit both alike
                times[mode].append(one(comm, buf, mode == "poll"))
        medians = {m: float(np.median(t)) for m, t in times.items()}
        both = comm.gather(medians)
        if comm.Get_rank() == 0:
            rows.append({"bytes": n, "sender": both[0], "receiver": both[1]})
    if comm.Get_rank() == 0:
        print(f"MPI: {MPI.Get_library_version().splitlines()[0].strip()}")
        print(f"{'bytes':>10} | {'side':8} | {'block ms':>9} | {'poll ms':>9} | poll / block")
        for r in rows:
            for side in ("sender", "receiver"):
                b, q = r[side]["block"] * 1e3, r[side]["poll"] * 1e3
                print(f"{r['bytes']:>10,} | {side:8} | {b:9.2f} | {q:9.2f} | {q / b:6.1f}x")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"mpi": MPI.Get_library_version().strip(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
