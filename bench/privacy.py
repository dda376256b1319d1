"""Secure aggregation's cost per aggregation against plain aggregation, as clients per edge grow.

    .venv/bin/python bench/privacy.py --dim 75268 --clients 2,4,8,16 --repeats 3 [--encodings fixed,int8] [--json out.json]

Runs the protocol hierfed runs at an edge (hierfed.privacy.secagg: X25519 adverts, Shamir shares
sealed with ChaCha20-Poly1305, ChaCha20 masks, unmasking) in one process, for n clients with updates
of `dim` values (75,268: the default MiniLM + LoRA job's vector), without and with one client
dropping after masking, per encoding: `fixed` (fixed point in Z_2^32, identity/fp32 uplinks) and
`int8` (the int8 codec's codes on the shared grid, in the ring the n clients' sum fits: Z_2^16 up to
258 clients). Bytes are the messages' sizes as hierfed.privacy.secagg_link counts them (pickled, + 8
bytes a message) per client and direction, against plain aggregation's one float32 [w·Δ, w] vector
up and the plain int8 codec's payload (no SecAgg). Time: the mean client's work (advertise, share,
mask, reveal) and the edge's (route, unmask), single-threaded on this machine; clients work in
parallel in a deployment, so a round costs about one client's time plus the edge's. The unmasked sum
is checked against the plaintext sum of the encodings every repetition, outside the timing.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import time

import numpy as np

from common import git_state
from hierfed.comm.codecs import parse_codec
from hierfed.privacy.ring import FixedPoint, SharedGrid
from hierfed.privacy.secagg import Client, Server


def _size(obj) -> int:
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)) + 8


def one(n: int, dim: int, drop: int, seed: int, encoding: str = "fixed") -> dict:
    rng = np.random.default_rng(seed)
    if encoding == "fixed":
        fp = FixedPoint(bound=1.0, fan_out=n)
        xs = {c: fp.encode(rng.uniform(-1, 1, dim), 1.0)[0] for c in range(n)}
    else:
        grid = SharedGrid(1.0, 8, fan_out=n)
        xs = {c: grid.encode(rng.uniform(-1, 1, dim), 1.0, rng)[0] for c in range(n)}
    ring = 8 * xs[0].itemsize
    tag = b"bench"
    up = {c: 0 for c in xs}
    down = {c: 0 for c in xs}
    client_s = {c: 0.0 for c in xs}
    t0 = time.perf_counter()
    server = Server(tag, 0.5)
    edge_s = time.perf_counter() - t0

    clients = {}
    for c in xs:
        t = time.perf_counter()
        clients[c] = Client(c, tag)
        adv = clients[c].advertise()
        client_s[c] += time.perf_counter() - t
        up[c] += _size({c: adv})
    t = time.perf_counter()
    adverts = server.collect_adverts({c: cl.advertise() for c, cl in clients.items()})
    edge_s += time.perf_counter() - t
    sealed, commits = {}, {}
    for c, cl in clients.items():
        down[c] += _size(adverts)
        t = time.perf_counter()
        sealed[c], commits[c] = cl.share(adverts, server.t)
        client_s[c] += time.perf_counter() - t
        up[c] += _size(({c: sealed[c]}, {c: commits[c]}))
    t = time.perf_counter()
    routed = server.route(sealed, commits)
    edge_s += time.perf_counter() - t
    ys = {}
    for c, cl in clients.items():
        down[c] += _size(({c: routed[c]}, server.members))
        t = time.perf_counter()
        cl.receive(routed[c])
        ys[c] = cl.mask(xs[c], server.members)
        client_s[c] += time.perf_counter() - t
        up[c] += ys[c].nbytes
    survivors = [c for c in server.members if c >= drop]
    dropped = [c for c in server.members if c < drop]
    total = np.zeros(xs[0].size, dtype=xs[0].dtype)
    for c in survivors:
        total += ys[c]
        up[c] += _size(([c], 0))
    reveals = {}
    for c in survivors:
        down[c] += _size((survivors, dropped))
        t = time.perf_counter()
        reveals[c] = clients[c].reveal(survivors, dropped)
        client_s[c] += time.perf_counter() - t
        up[c] += _size({c: reveals[c]})
    t = time.perf_counter()
    got = server.unmask(total, survivors, reveals)
    edge_s += time.perf_counter() - t
    want = np.zeros(xs[0].size, dtype=xs[0].dtype)
    for c in survivors:
        want += xs[c]
    assert np.array_equal(got, want), "unmasked sum differs from the plaintext sum"
    return {"ring": ring, "client_s": statistics.mean(client_s.values()), "edge_s": edge_s,
            "up_per_client": statistics.mean(up.values()), "down_per_client": statistics.mean(down.values()),
            "plain_up_per_client": 4 * (dim + 1), "plain_int8_up_per_client": parse_codec("int8").encoded_size(dim) + 16 + 8}  # + (weight, length), + size


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=75268)
    p.add_argument("--clients", default="2,4,8,16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--encodings", default="fixed,int8", help="fixed (Z_2^32) and/or int8 (shared grid, Z_2^16 when it fits)")
    p.add_argument("--json")
    a = p.parse_args()
    rows = []
    for encoding in a.encodings.split(","):
        for n in (int(x) for x in a.clients.split(",")):
            for drop in (0, 1):
                if drop and n < 3:
                    continue  # t = 2 of 2: one dropout fails the round
                runs = [one(n, a.dim, drop, r, encoding) for r in range(a.repeats)]
                row = {"encoding": encoding, "clients": n, "dropped": drop, **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}
                rows.append(row)
                print(f"{encoding:5s} Z_2^{row['ring']:.0f} n={n:3d} dropped={drop}  client {row['client_s'] * 1e3:8.1f} ms  "
                      f"edge {row['edge_s'] * 1e3:8.1f} ms  up/client {row['up_per_client'] / 1e3:8.1f} kB "
                      f"(plain fp32 {row['plain_up_per_client'] / 1e3:.1f}, plain int8 {row['plain_int8_up_per_client'] / 1e3:.1f})  "
                      f"down/client {row['down_per_client'] / 1e3:6.1f} kB", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"commit": git_state(), "dim": a.dim, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
