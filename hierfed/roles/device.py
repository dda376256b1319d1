"""A device rank: trains its (virtual) clients locally and sends their weighted update up.

A rank with several virtual clients trains them one after another from the same parameters and
sums their contributions locally, so its parent receives one buffer whatever the client count.
"""

from __future__ import annotations

import time

import numpy as np

from hierfed.data import load_data, partition
from hierfed.engine import LocalTrainer, configure_threads, derive_seed, tokenize
from hierfed.model import FlatView, build_model
from hierfed.roles.protocol import check_plan, sampled_clients
from hierfed.strategy import Strategy


def run(rt, cfg) -> None:
    spec = rt.role.device
    configure_threads(cfg.runtime.threads)
    task = load_data(cfg.data)
    shards = partition(task.train, rt.placement.num_clients, cfg.data.partition, alpha=cfg.data.alpha, seed=cfg.data.seed)
    built = build_model(cfg.model, cfg.peft, task.kind, task.num_labels, cfg.seed)
    flat = FlatView(built.model)
    data = {c: tokenize(built.tokenizer, [task.train[i] for i in shards[c]], task.kind, cfg.model.max_length) for c in spec.clients}
    trainer = LocalTrainer(built.model, cfg.train)

    plan = rt.up.bcast_obj()
    check_plan(plan, flat.dim, flat.fingerprint(), flat.base_fingerprint(), rt.role.name)
    edge_rounds = 1 if rt.placement.flat else cfg.schedule.tau2
    params = np.empty(flat.dim, dtype=np.float32)
    acc = np.empty(Strategy.payload_size(flat.dim), dtype=np.float32)
    for t in range(plan.start_round, cfg.schedule.rounds + 1):
        chosen = set(sampled_clients(rt.placement.num_clients, cfg.schedule.client_fraction, cfg.seed, t).tolist())
        mine = [c for c in spec.clients if c in chosen]
        for s in range(1, edge_rounds + 1):
            rt.up.bcast(params)
            acc[:] = 0
            loss_sum, started = 0.0, time.perf_counter()
            for c in mine:
                flat.set(params)
                loss, _ = trainer.train(data[c], cfg.schedule.tau1, derive_seed(cfg.seed, t, s, c))
                weight = len(data[c])  # FedAvg weights a client by its local data size
                Strategy.accumulate(acc, flat.get() - params, weight)
                loss_sum += loss * weight
            compute_s = time.perf_counter() - started
            rt.up.reduce_sum(acc)
            rt.up.gather_obj(
                {"loss_sum": loss_sum, "weight": float(acc[-1]), "clients": len(mine), "compute_s": compute_s, "bytes": rt.ledger.take_round()}
            )
