"""Secure aggregation's cost per aggregation against plain aggregation, as clients per edge grow.

    .venv/bin/python bench/privacy.py --dim 75268 --clients 2,4,8,16 --repeats 3 [--json out.json]

Runs the protocol hierfed runs at an edge (hierfed.privacy.secagg: X25519 adverts, Shamir shares
sealed with ChaCha20-Poly1305, ChaCha20 masks in Z_2^32, unmasking) in one process, for n clients
with updates of `dim` values (75,268: the default MiniLM + LoRA job's vector), without and with one
client dropping after masking. Bytes are the messages' sizes as hierfed.privacy.secagg_link counts
them (pickled, + 8 bytes a message) per client and direction, against plain aggregation's one
float32 [w·Δ, w] vector up. Time: the mean client's work (advertise, share, mask, reveal) and the
edge's (route, unmask), single-threaded on this machine; clients work in parallel in a deployment,
so a round costs about one client's time plus the edge's. The unmasked sum is checked against the
plaintext fixed-point sum every repetition, outside the timing.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import time

import numpy as np

from common import git_state
from hierfed.privacy.ring import FixedPoint
from hierfed.privacy.secagg import Client, Server


def _size(obj) -> int:
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)) + 8


def one(n: int, dim: int, drop: int, seed: int) -> dict:
    fp = FixedPoint(bound=1.0, fan_out=n)
    rng = np.random.default_rng(seed)
    xs = {c: fp.encode(rng.uniform(-1, 1, dim), 1.0)[0] for c in range(n)}
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
    total = np.zeros(dim + 1, dtype=np.uint32)
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
    want = np.zeros(dim + 1, dtype=np.uint32)
    for c in survivors:
        want += xs[c]
    assert np.array_equal(got, want), "unmasked sum differs from the plaintext sum"
    return {"client_s": statistics.mean(client_s.values()), "edge_s": edge_s,
            "up_per_client": statistics.mean(up.values()), "down_per_client": statistics.mean(down.values()),
            "plain_up_per_client": 4 * (dim + 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=75268)
    p.add_argument("--clients", default="2,4,8,16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args()
    rows = []
    for n in (int(x) for x in a.clients.split(",")):
        for drop in (0, 1):
            if drop and n < 3:
                continue  # t = 2 of 2: one dropout fails the round
            runs = [one(n, a.dim, drop, r) for r in range(a.repeats)]
            row = {"clients": n, "dropped": drop, **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}
            rows.append(row)
            print(f"n={n:3d} dropped={drop}  client {row['client_s'] * 1e3:8.1f} ms  edge {row['edge_s'] * 1e3:8.1f} ms  "
                  f"up/client {row['up_per_client'] / 1e3:8.1f} kB (plain {row['plain_up_per_client'] / 1e3:.1f})  "
                  f"down/client {row['down_per_client'] / 1e3:6.1f} kB", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"commit": git_state(), "dim": a.dim, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
