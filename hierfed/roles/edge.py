"""An edge rank: partial aggregation of its devices every edge round, one update to the cloud per
cloud round. Works on flat float32 vectors only: it never builds a model (no torch import)."""

from __future__ import annotations

import time

import numpy as np

from hierfed.comm.ledger import merge
from hierfed.roles.protocol import aggregation_round
from hierfed.strategy import Strategy, build_strategy


def run(rt, cfg) -> None:
    strategy = build_strategy(cfg.aggregation.edge)
    plan = rt.up.bcast_obj()
    rt.down.bcast_obj(plan)
    strategy.load_state_dict(plan.edge_states.get(rt.role.edge, {}))
    name = rt.role.name

    params = np.empty(plan.dim, dtype=np.float32)
    for t in range(plan.start_round, cfg.schedule.rounds + 1):
        rt.up.bcast(params)
        local = params.astype(np.float64)  # the edge's master copy
        weight_sum, rows = 0.0, []
        for s in range(1, cfg.schedule.tau2 + 1):
            started = time.perf_counter()
            local, weight, telemetry, agg_s = aggregation_round(rt.down, local, strategy)
            weight_sum += weight
            w = sum(d["weight"] for d in telemetry)
            rows.append({
                "round": t, "edge_round": s, "tier": "edge", "edge": name,
                "loss": sum(d["loss_sum"] for d in telemetry) / w if w else None,
                "clients": sum(d["clients"] for d in telemetry),
                "samples": w,
                "bytes": merge([d["bytes"] for d in telemetry] + [rt.ledger.take_round()]),
                "seconds": {"wall": time.perf_counter() - started, "compute": max(d["compute_s"] for d in telemetry), "aggregate": agg_s},
            })
        # Up to the cloud: the edge's whole change this cloud round, weighted by the samples behind it.
        payload = Strategy.contribution(local - params, weight_sum)
        rt.up.reduce_sum(payload)
        rt.up.gather_obj({"rows": rows, "bytes": rt.ledger.take_round(), "strategy_state": strategy.state_dict()})
