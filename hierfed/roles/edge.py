"""An edge rank: partial aggregation of its devices every edge round, one update to the cloud per
cloud round. Works on flat float32 vectors only: it never builds a model (no torch import)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from hierfed.checkpoint import RankState
from hierfed.comm.ledger import merge
from hierfed.roles.protocol import aggregation_round, child_link, codec_rng, parent_link, prefixed, sampled_clients, unprefixed
from hierfed.strategy import build_strategy


def run(rt, cfg) -> None:
    strategy = build_strategy(cfg.aggregation.edge)
    plan = rt.up.bcast_obj()
    rt.down.bcast_obj(plan)
    strategy.load_state_dict(plan.edge_states.get(rt.role.edge, {}))
    up = child_link(rt.up, cfg, False, "cloud", plan.dim, plan.start_round > 1)
    down = parent_link(rt.down, cfg, False, "edge", plan.dim)
    # Sender state: the uplink's error-feedback residual and what the devices hold (codec downlink).
    saved = RankState(Path(plan.out), rt.role.rank, cfg.checkpoint.keep)
    has_state = up.feedback is not None or not down.down.is_identity
    if plan.start_round > 1 and has_state:
        state = saved.load(plan.start_round - 1)
        up.load_state_dict(unprefixed("up", state))
        down.load_state_dict(unprefixed("down", state))
    me = rt.placement.edges[rt.role.edge]
    my_clients = {c for d in me.devices for c in d.clients}

    params = np.empty(plan.dim, dtype=np.float32)
    for t in range(plan.start_round, cfg.schedule.rounds + 1):
        up.receive(params)
        local = params.astype(np.float64)  # the edge's master copy
        sampled = my_clients.intersection(sampled_clients(rt.placement.num_clients, cfg.schedule.client_fraction, cfg.seed, t).tolist())
        weight_sum, rows = 0.0, []
        for s in range(1, cfg.schedule.tau2 + 1):
            started = time.perf_counter()
            rng = codec_rng(cfg.seed, t, s, rt.role.rank, 1)
            local, weight, telemetry, agg_s = aggregation_round(down, local, strategy, receivers=len(sampled), rng=rng)
            weight_sum += weight
            w = sum(d["weight"] for d in telemetry)
            rows.append({
                "round": t, "edge_round": s, "tier": "edge", "edge": rt.role.name,
                "loss": sum(d["loss_sum"] for d in telemetry) / w if w else None,
                "clients": sum(d["clients"] for d in telemetry),
                "samples": w,
                "bytes": merge([d["bytes"] for d in telemetry] + [rt.ledger.take_round()]),
                "seconds": {"wall": time.perf_counter() - started, "compute": max(d["compute_s"] for d in telemetry), "aggregate": agg_s},
            })
        # Up to the cloud: the edge's whole change this cloud round, weighted by the samples behind it.
        if weight_sum > 0:
            up.add(rt.role.edge, weight_sum, local - params, codec_rng(cfg.seed, t, 0, rt.role.rank, 2))
        up.send()
        rt.up.gather_obj({"rows": rows, "bytes": rt.ledger.take_round(), "strategy_state": strategy.state_dict()})
        if has_state and (t % cfg.checkpoint.every == 0 or t == cfg.schedule.rounds):
            saved.save(t, {**prefixed("up", up.state_dict()), **prefixed("down", down.state_dict())})
