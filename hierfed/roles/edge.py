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
    split = SplitDevices(rt, cfg, plan) if any(d.split_layers is not None for d in me.devices) else None

    params = np.empty(plan.dim, dtype=np.float32)
    for t in range(plan.start_round, cfg.schedule.rounds + 1):
        up.receive(params)
        local = params.astype(np.float64)  # the edge's master copy
        sampled = my_clients.intersection(sampled_clients(rt.placement.num_clients, cfg.schedule.client_fraction, cfg.seed, t).tolist())
        weight_sum, rows = 0.0, []
        for s in range(1, cfg.schedule.tau2 + 1):
            started = time.perf_counter()
            rng = codec_rng(cfg.seed, t, s, rt.role.rank, 1)
            if split is None:
                local, weight, telemetry, agg_s = aggregation_round(down, local, strategy, receivers=len(sampled), rng=rng)
            else:
                start = local.astype(np.float32)
                local, weight, telemetry, agg_s = aggregation_round(
                    down, local, strategy, receivers=len(sampled), rng=rng,
                    while_children_work=lambda: split.serve(start, t, s, sampled), add_own=split.add_own,
                )
            weight_sum += weight
            w = sum(d["weight"] for d in telemetry)
            rows.append({
                "round": t, "edge_round": s, "tier": "edge", "edge": rt.role.name,
                "loss": sum(d["loss_sum"] for d in telemetry) / w if w else None,
                "clients": sum(d["clients"] for d in telemetry),
                "samples": w,
                "bytes": merge([d["bytes"] for d in telemetry] + [rt.ledger.take_round()]),
                "seconds": {"wall": time.perf_counter() - started, "compute": max(d["compute_s"] for d in telemetry), "aggregate": agg_s,
                            **({"edge_busy": split.take_busy()} if split else {})},
            })
        # Up to the cloud: the edge's whole change this cloud round, weighted by the samples behind it.
        if weight_sum > 0:
            up.add(rt.role.edge, weight_sum, local - params, codec_rng(cfg.seed, t, 0, rt.role.rank, 2))
        up.send()
        rt.up.gather_obj({"rows": rows, "bytes": rt.ledger.take_round(), "strategy_state": strategy.state_dict()})
        if has_state and (t % cfg.checkpoint.every == 0 or t == cfg.schedule.rounds):
            saved.save(t, {**prefixed("up", up.state_dict()), **prefixed("down", down.state_dict())})


class SplitDevices:
    """The edge's half of split placement: the upper stage it trains for its split devices."""

    def __init__(self, rt, cfg, plan) -> None:
        from hierfed.data import load_data, partition
        from hierfed.engine import configure_threads, torch_device
        from hierfed.model import FlatView, build_model
        from hierfed.roles.protocol import check_plan
        from hierfed.split import prune_for_edge
        from hierfed.splitlink import SplitServer, global_index, split_plan

        configure_threads(cfg.runtime.threads)
        self.cfg = cfg
        task = load_data(cfg.data)
        shards = partition(task.train, rt.placement.num_clients, cfg.data.partition, alpha=cfg.data.alpha, seed=cfg.data.seed)
        ks = split_plan(rt.placement, cfg, task.kind, task.num_labels)
        me = rt.placement.edges[rt.role.edge]
        # device comm rank (1 + its place among the edge's devices) -> (client, weight)
        self.devices = {i + 1: (d.clients[0], len(shards[d.clients[0]])) for i, d in enumerate(me.devices) if ks[d.rank] is not None}
        k = min(ks[d.rank] for d in me.devices if ks[d.rank] is not None)
        built = build_model(cfg.model, cfg.peft, task.kind, task.num_labels, cfg.seed, torch_device(cfg.runtime.device))
        whole = FlatView(built.model)
        check_plan(plan, whole.dim, whole.fingerprint(), whole.base_fingerprint(), rt.role.name)
        prune_for_edge(built.model, k)
        self.server = SplitServer(rt.down.comm, built.model, task.kind, k, cfg, rt.ledger, cfg.runtime.wait == "poll")
        self.index = global_index(whole, self.server.flat)
        self.server.handshake(sorted(self.devices))
        self.start: np.ndarray | None = None
        self.weight = 0.0

    def serve(self, params: np.ndarray, t: int, s: int, sampled: set[int]) -> None:
        from hierfed.engine import derive_seed

        active = {r: derive_seed(self.cfg.seed, t, s, c) for r, (c, _) in self.devices.items() if c in sampled}
        self.start = params[self.index].copy()
        self.server.flat.set(self.start)
        self.weight = float(sum(w for r, (c, w) in self.devices.items() if r in active))
        if active:
            self.server.serve(active, self.cfg.schedule.tau1)

    def add_own(self, reduced: np.ndarray) -> None:
        """The split devices' upper-block update, weighted by their samples, into the edge's sum."""
        if self.weight:
            reduced[self.index] += self.weight * (self.server.flat.get().astype(np.float64) - self.start)

    def take_busy(self) -> float:
        busy, self.server.busy_s = self.server.busy_s, 0.0
        return busy
