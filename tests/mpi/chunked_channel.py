"""Run under mpiexec by tests/mpi/test_channel.py: the Channel's collectives with the limit forced to
a few elements (HIERFED_COMM_CHUNK) against the same collectives in one piece. Rank 0 prints one
JSON line with what it saw."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from mpi4py import MPI

from hierfed.comm.channel import Channel, _chunks
from hierfed.comm.codecs import parse_codec
from hierfed.comm.ledger import Ledger
from hierfed.comm.links import Child, Parent

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
rng = np.random.default_rng(rank)
dim = 1003  # not a multiple of any chunk below
results = {}
for chunk in (None, "7", "64"):
    if chunk is None:
        os.environ.pop("HIERFED_COMM_CHUNK", None)
    else:
        os.environ["HIERFED_COMM_CHUNK"] = chunk
    ch = Channel(comm, "device-edge", Ledger(), poll=True, is_parent=rank == 0)
    params = np.arange(dim, dtype=np.float32) if rank == 0 else np.zeros(dim, dtype=np.float32)
    ch.bcast(params)
    delta = (np.random.default_rng(rank).normal(size=dim)).astype(np.float32)
    ch.reduce_sum(delta)
    payload = np.random.default_rng(100 + rank).integers(0, 256, size=37 * rank, dtype=np.uint8)  # 0, 37, 74, ... bytes
    got = ch.gather_bytes(payload if rank else payload[:0])
    objs = ch.gather_obj({"rank": rank, "array": np.full(50 * rank, rank, dtype=np.int16)})
    # the gathered path: rank r's r senders each send their own update; the parent gets every row
    rows_ok = {}
    for spec in ("identity", "fp16"):
        codec = parse_codec(spec)
        if rank == 0:
            updates, weights = Parent(ch, codec, codec, dim, gathered=True).receive_updates()
            want = [(10 * r + i, np.random.default_rng([r, i]).normal(size=dim).astype(np.float32))
                    for r in range(1, comm.Get_size()) for i in range(r)]
            rows_ok[spec] = bool(len(updates) == len(want) and all(
                w == weights[j] and np.array_equal(updates[j], codec.decode(codec.encode(u, None), dim)) for j, (w, u) in enumerate(want)))
        else:
            child = Child(ch, codec, codec, dim, error_feedback=False, gathered=True)
            for i in range(rank):
                child.add(i, 10 * rank + i, np.random.default_rng([rank, i]).normal(size=dim).astype(np.float32))
            child.send()
    bcast_ok = comm.allreduce(int(np.array_equal(params, np.arange(dim, dtype=np.float32))), op=MPI.MIN)
    if rank == 0:
        results[chunk or "whole"] = {
            "bcast_everywhere": bcast_ok,
            "gathered_rows": rows_ok,
            "pieces": len(_chunks(params)),
            "sum": delta.tolist(),
            "payloads": [p.tolist() for p in got],
            "objs": [[o["rank"], o["array"].tolist()] for o in objs],
        }
if rank == 0:
    expected_payloads = [np.random.default_rng(100 + r).integers(0, 256, size=37 * r, dtype=np.uint8).tolist() for r in range(1, comm.Get_size())]
    results["expected_payloads"] = expected_payloads
    sys.stdout.write(json.dumps(results) + "\n")
