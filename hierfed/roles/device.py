"""A device rank: trains its (virtual) clients locally and sends their weighted updates up.

A rank with several virtual clients trains them one after another from the same parameters; each
client's update is queued on the uplink (summed locally when uncompressed, encoded per client with
its own error-feedback residual when compressed) and the rank sends once per edge round.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from hierfed.checkpoint import RankState
from hierfed.data import load_data, partition
from hierfed.engine import LocalTrainer, configure_threads, derive_seed, tokenize
from hierfed.model import FlatView, build_model
from hierfed.roles.protocol import check_plan, child_link, codec_rng, sampled_clients


def run(rt, cfg) -> None:
    configure_threads(cfg.runtime.threads)
    spec = rt.role.device
    task = load_data(cfg.data)
    shards = partition(task.train, rt.placement.num_clients, cfg.data.partition, alpha=cfg.data.alpha, seed=cfg.data.seed)
    built = build_model(cfg.model, cfg.peft, task.kind, task.num_labels, cfg.seed)
    flat = FlatView(built.model)
    data = {c: tokenize(built.tokenizer, [task.train[i] for i in shards[c]], task.kind, cfg.model.max_length) for c in spec.clients}
    trainer = LocalTrainer(built.model, cfg.train)

    plan = rt.up.bcast_obj()
    check_plan(plan, flat.dim, flat.fingerprint(), flat.base_fingerprint(), rt.role.name)
    link = child_link(rt.up, cfg, rt.placement.flat, "cloud" if rt.placement.flat else "edge", flat.dim, plan.start_round > 1)
    saved = RankState(Path(plan.out), rt.role.rank, cfg.checkpoint.keep)
    if plan.start_round > 1 and link.feedback is not None:
        link.load_state_dict(saved.load(plan.start_round - 1))

    edge_rounds = 1 if rt.placement.flat else cfg.schedule.tau2
    params = np.empty(flat.dim, dtype=np.float32)
    for t in range(plan.start_round, cfg.schedule.rounds + 1):
        chosen = set(sampled_clients(rt.placement.num_clients, cfg.schedule.client_fraction, cfg.seed, t).tolist())
        mine = [c for c in spec.clients if c in chosen]
        for s in range(1, edge_rounds + 1):
            link.receive(params)
            loss_sum, started = 0.0, time.perf_counter()
            for c in mine:
                flat.set(params)
                loss, _ = trainer.train(data[c], cfg.schedule.tau1, derive_seed(cfg.seed, t, s, c))
                weight = len(data[c])  # FedAvg weights a client by its local data size
                link.add(c, weight, flat.get() - params, codec_rng(cfg.seed, t, s, c))
                loss_sum += loss * weight
            compute_s = time.perf_counter() - started
            weight = link.send()
            rt.up.gather_obj({"loss_sum": loss_sum, "weight": weight, "clients": len(mine), "compute_s": compute_s, "bytes": rt.ledger.take_round()})
        if link.feedback is not None and (t % cfg.checkpoint.every == 0 or t == cfg.schedule.rounds):
            saved.save(t, link.state_dict())
