"""One full hierarchical aggregation (cloud -> edges -> devices -> edges -> cloud), three ways.

    mpiexec -n 7 .venv/bin/python bench/aggregation.py --sizes 1e6,1e7 --repeats 10 [--json out.json]

On the default topology (rank 0 cloud, ranks 1 and 4 edges, 2,3,5,6 devices) each repetition
moves a flat float32 vector of D parameters down to every device and the devices' weighted
updates back up to the cloud. Training is skipped: every device's delta is a fixed random vector.

  hierfed (poll)   hierfed's own path: Channels from `build_runtime`, wrapped in the uncompressed
  hierfed (block)  links (comm.links.Parent/Child), with the calls the roles make: Parent.send /
                   Child.receive / Child.add / Child.send / Parent.receive / FedAvg.aggregate on
                   float64 master copies (cloud and edges), in roles/edge.py's order (the edge
                   forwards the float32 vector it received and makes its master copy while the
                   devices work; Child.add(base=) forms its update), without telemetry (gather_obj); once
                   with runtime.wait `poll` (what `auto` picks when ranks outnumber cores), once
                   with `block`.
  floor            the bare MPI collectives on the same communicators and buffers: blocking
                   Bcast, Bcast, Reduce, Reduce; no strategy math, no copies.
  object           what many FL frameworks do: the model as a dict of 50 torch tensors, pickled
                   and sent point-to-point with lower-case comm.send/recv; edges and cloud
                   average the (update dict, weight) pairs tensor by tensor with torch.

Time is measured at the cloud, from its first send until it holds the new parameters, with a
barrier before each repetition; methods are interleaved per repetition. The barrier polls with
sleeps (hierfed.comm.channel.wait), so a rank that has finished its part of a round idles instead of
spinning in MPI and taking a core from the ranks still working (e.g. 7 ranks on 2 cores). The
hierfed and object results are checked against a numpy float64 reference every repetition
(outside the timing), so the benchmark cannot silently time a broken path.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import numpy as np
import torch
from mpi4py import MPI

from hierfed.comm.channel import wait
from hierfed.comm.codecs import parse_codec
from hierfed.comm.links import Child, Parent
from hierfed.errors import HierfedError
from hierfed.runtime.failure import guarded, report_once
from hierfed.runtime.world import build_runtime
from hierfed.strategy import FedAvg, Strategy
from hierfed.topology import load_topology

SEED = 20240
N_TENSORS = 50
RTOL = 1e-5  # max |got - ref| / max |ref|


def weight_of(rank: int) -> float:
    return float(10 + rank)  # a device's sample count; differs per device so weighting matters


def params_of(dim: int) -> np.ndarray:
    return np.random.default_rng([SEED, dim]).standard_normal(dim, dtype=np.float32)


def delta_of(dim: int, rank: int) -> np.ndarray:
    return 0.01 * np.random.default_rng([SEED, dim, rank]).standard_normal(dim, dtype=np.float32)


def as_dict(flat: np.ndarray) -> dict[str, torch.Tensor]:
    return {f"layer{i}.weight": torch.from_numpy(c.copy()) for i, c in enumerate(np.array_split(flat, N_TENSORS))}


def weighted_avg(updates: list[tuple[dict[str, torch.Tensor], float]]) -> tuple[dict[str, torch.Tensor], float]:
    total = sum(w for _, w in updates)
    return {k: sum(u[k] * w for u, w in updates) / total for k in updates[0][0]}, total


class Rank:
    """One rank's buffers and communicators for one size D (made once, outside the timing)."""

    def __init__(self, rt, rt_block, dim: int) -> None:
        self.rt, self.rt_block, self.kind, self.dim = rt, rt_block, rt.role.kind, dim
        rank = MPI.COMM_WORLD.Get_rank()
        self.strategy = FedAvg()
        self.params = params_of(dim) if self.kind == "cloud" else np.empty(dim, dtype=np.float32)
        self.master = self.params.astype(np.float64) if self.kind == "cloud" else None  # roles/cloud.py
        # The float64 buffers the roles reuse every round: the edge's master copy; the cloud updates
        # its master in place, here into `new` instead so that every repetition starts from the same one.
        self.local = np.empty(dim, dtype=np.float64) if self.kind == "edge" else None
        self.new = np.empty(dim, dtype=np.float64) if self.kind == "cloud" else None
        ident = parse_codec("identity")  # what protocol.parent_link/child_link build when uncompressed
        self.links = {b: (Parent(r.down, ident, ident, dim) if r.down else None,
                          Child(r.up, ident, ident, dim, error_feedback=False) if r.up else None)
                      for b, r in ((False, rt), (True, rt_block))}
        self.reduced = np.zeros(Strategy.payload_size(dim), dtype=np.float32)  # floor's Reduce buffer
        if self.kind == "device":
            self.delta, self.weight = delta_of(dim, rank), weight_of(rank)
            self.acc = Strategy.contribution(self.delta, self.weight)
            self.update = (as_dict(self.delta), self.weight)
        if self.kind == "cloud":
            self.model = as_dict(self.params)

    # ---- 1. hierfed: the roles' calls (protocol.aggregation_round, edge.run, device.run), no telemetry
    def hierfed(self, block: bool) -> np.ndarray | None:
        down, up = self.links[block]
        if self.kind == "cloud":
            down.send(self.master)
            return self.strategy.aggregate(self.master, down.receive(), out=self.new)[0]
        if self.kind == "edge":
            up.receive(self.params)
            local = self.local
            down.send(self.params)  # the edge's first round sends the vector it received ...
            np.copyto(local, self.params)  # ... and makes its master copy while the devices work
            local, weight = self.strategy.aggregate(local, down.receive(), out=local)
            up.add(0, weight, local, base=self.params)  # local - params, scaled into the sum, block by block
            up.send()
            return None
        up.receive(self.params)
        up.add(0, self.weight, self.delta)
        up.send()
        return None

    # ---- 2. floor: bare blocking collectives on the same communicators and buffers
    def floor(self) -> None:
        if self.kind == "cloud":
            self.rt.down.comm.Bcast(self.params, root=0)
            self.rt.down.comm.Reduce(MPI.IN_PLACE, self.reduced, op=MPI.SUM, root=0)
        elif self.kind == "edge":
            self.rt.up.comm.Bcast(self.params, root=0)
            self.rt.down.comm.Bcast(self.params, root=0)
            self.rt.down.comm.Reduce(MPI.IN_PLACE, self.reduced, op=MPI.SUM, root=0)
            self.rt.up.comm.Reduce(self.reduced, None, op=MPI.SUM, root=0)
        else:
            self.rt.up.comm.Bcast(self.params, root=0)
            self.rt.up.comm.Reduce(self.acc, None, op=MPI.SUM, root=0)

    # ---- 3. object messaging: pickled dicts of tensors, point-to-point
    def objects(self) -> dict[str, torch.Tensor] | None:
        if self.kind == "cloud":
            comm = self.rt.down.comm
            for child in range(1, comm.Get_size()):
                comm.send(self.model, dest=child)
            avg, _ = weighted_avg([comm.recv(source=c) for c in range(1, comm.Get_size())])
            return {k: self.model[k] + avg[k] for k in self.model}
        if self.kind == "edge":
            up, down = self.rt.up.comm, self.rt.down.comm
            model = up.recv(source=0)
            for child in range(1, down.Get_size()):
                down.send(model, dest=child)
            avg, weight = weighted_avg([down.recv(source=c) for c in range(1, down.Get_size())])
            new = {k: model[k] + avg[k] for k in model}
            up.send(({k: new[k] - model[k] for k in model}, weight), dest=0)
            return None
        self.rt.up.comm.recv(source=0)
        self.rt.up.comm.send(self.update, dest=0)
        return None


def reference(placement, dim: int) -> np.ndarray:
    """params + sum_i w_i delta_i / sum_i w_i over all devices, in float64."""
    weights = [weight_of(d.rank) for d in placement.devices]
    acc = sum(w * delta_of(dim, d.rank).astype(np.float64) for d, w in zip(placement.devices, weights))
    return params_of(dim) + acc / sum(weights)


def check(name: str, got: np.ndarray | dict[str, torch.Tensor], ref: np.ndarray) -> None:
    if isinstance(got, dict):
        got = torch.cat(list(got.values())).numpy()
    err = float(np.max(np.abs(got - ref))) / float(np.max(np.abs(ref)))
    if not err <= RTOL:
        raise RuntimeError(f"{name}: aggregated vector differs from the numpy reference (max rel err {err:.2e})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e6,1e7", help="comma-separated D values, e.g. 1e6,1e7")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="write the results to this path")
    args = ap.parse_args()
    torch.set_num_threads(1)
    placement = load_topology("default").placement()
    try:
        placement.check_world_size(MPI.COMM_WORLD.Get_size())
    except HierfedError as e:
        report_once(str(e))
        raise SystemExit(2) from None
    rt = build_runtime(placement, "poll", 1, out="-", resume=False, config_text="")
    rt_block = build_runtime(placement, "block", 1, out="-", resume=False, config_text="")
    guarded(rt.role.name, lambda: bench(args, placement, rt, rt_block))  # a failed check aborts every rank


def bench(args, placement, rt, rt_block) -> None:
    world = MPI.COMM_WORLD
    is_cloud = rt.role.kind == "cloud"
    methods = ["floor", "hierfed (poll)", "hierfed (block)", "object"]

    results, load = [], os.getloadavg()  # other jobs on the machine skew every number
    for dim in (int(float(s)) for s in args.sizes.split(",")):
        me = Rank(rt, rt_block, dim)
        ref = reference(placement, dim) if is_cloud else None
        runs = {"floor": me.floor, "hierfed (poll)": functools.partial(me.hierfed, False),
                "hierfed (block)": functools.partial(me.hierfed, True), "object": me.objects}
        times: dict[str, list[float]] = {m: [] for m in methods}
        for rep in range(args.warmup + args.repeats):
            for m in methods:  # interleaved, so drift on the machine hits every method alike
                wait(world.Ibarrier(), poll=True)  # idle ranks sleep, as in a real run between rounds
                t0 = time.perf_counter()
                out = runs[m]()
                dt = time.perf_counter() - t0
                if is_cloud and m != "floor":
                    check(f"{m}, D={dim}", out, ref)
                if rep >= args.warmup:
                    times[m].append(dt)
        if is_cloud:  # only the cloud's clock counts: a round starts and ends there
            floor = statistics.median(times["floor"])
            for m in methods:
                med = statistics.median(times[m])
                results.append({"dim": dim, "method": m, "median_s": med, "min_s": min(times[m]),
                                "ratio_to_floor": med / floor, "repeats": args.repeats, "times_s": times[m]})
        del me, runs

    if is_cloud:
        print(f"# {world.Get_size()} ranks, {MPI.Get_library_version().splitlines()[0].strip()}, "
              f"{args.repeats} repeats + {args.warmup} warm-up, load average at start {load[0]:.2f}")
        print(f"{'D':>12}  {'method':<16} {'median s':>10} {'min s':>10} {'/ floor':>8}")
        for r in results:
            print(f"{r['dim']:>12,}  {r['method']:<16} {r['median_s']:>10.4f} {r['min_s']:>10.4f} {r['ratio_to_floor']:>7.2f}×")
        for dim in dict.fromkeys(r["dim"] for r in results):
            med = {r["method"]: r["median_s"] for r in results if r["dim"] == dim}
            for how in ("poll", "block"):
                h = med[f"hierfed ({how})"]
                print(f"D={dim:,} [{how}]: hierfed/floor = {h / med['floor']:.2f}×, object/hierfed = {med['object'] / h:.2f}×")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world_size": world.Get_size(), "mpi": MPI.Get_library_version().splitlines()[0].strip(),
                           "cpus": os.cpu_count(), "load_average_at_start": load, "warmup": args.warmup,
                           "results": results}, f, indent=2)
        print("all hierfed and object results matched the numpy reference", flush=True)


if __name__ == "__main__":
    main()
