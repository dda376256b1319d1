"""A device rank: trains its (virtual) clients locally and sends their weighted updates up.

A rank with several virtual clients trains them one after another from the same parameters; each
client's update is queued on the uplink (summed locally when uncompressed, encoded per client with
its own error-feedback residual when compressed) and the rank sends once per edge round.
A split device (split_layers in the topology) keeps only the embeddings and its first k blocks and
trains them with its edge over the cut (hierfed.placement.link); its update covers its own blocks only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from hierfed.data import load_data, partition, take
from hierfed.model import FlatView, build_model
from hierfed.privacy import wrap_child
from hierfed.roles.attack import attack_hook
from hierfed.roles.hetero import ClientSchedule
from hierfed.roles.protocol import check_plan, child_link, codec_rng, local_steps, prefixed, round_clients, unprefixed
from hierfed.roles.work import StepCost, share_of_uplink
from hierfed.runtime.checkpoint import RankState
from hierfed.strategy.client import build_client
from hierfed.training import LocalTrainer, configure_threads, tokenize, torch_device


def run(rt, cfg) -> None:
    configure_threads(cfg.runtime.threads)
    spec = rt.role.device
    task = load_data(cfg.data)
    shards = partition(task.train, rt.placement.num_clients, cfg.data.partition, alpha=cfg.data.alpha, seed=cfg.data.seed)
    ks: dict[int, int | None] = {}  # split device rank -> its k (None: its `auto` resolved to the whole model)
    if spec.split_layers is not None:
        from hierfed.placement.plan import split_plan

        ks = split_plan(rt.placement, cfg, task.kind, task.num_labels)
    k = ks.get(spec.rank)
    # A split device holds only the embeddings and its k blocks (from disk, only they are loaded).
    built = build_model(cfg.model, cfg.peft, task.kind, task.num_labels, cfg.seed, torch_device(cfg.runtime.device), blocks=k)
    data = {c: tokenize(built.tokenizer, take(task.train, shards[c]), task.kind, cfg.model.max_length) for c in spec.clients}

    layout_model = None
    split = None  # a split device's client end of the cut (the trainer too)
    if k is None:
        layout = flat = FlatView(built.model)  # the whole model's trainable parameters: the vector that travels
        trainer: LocalTrainer | SplitClient = LocalTrainer(built.model, cfg.train)
        mine_idx = None
    else:
        from hierfed.placement.dsconfig import use_deepspeed
        from hierfed.placement.link import SplitClient, global_index
        from hierfed.placement.memory import skeleton

        layout_model = skeleton(cfg, task.kind, task.num_labels)
        layout = FlatView(layout_model)  # the whole model's, from its meta skeleton
        server = rt.placement.edges[spec.edge].servers(ks)[spec.rank]
        # a DeepSpeed edge trains one upper stage shared by its split devices (docs/split.md)
        shared = use_deepspeed(cfg, len(rt.placement.edges[spec.edge].ranks))
        trainer = split = SplitClient(rt.split_comm, server, built.model, k, cfg, rt.ledger, rt.poll, shared)
        flat, mine_idx = split.flat, global_index(layout, split.flat)

    plan = rt.up.bcast_obj()
    # the frozen weights this rank holds (a split device: its part) must be the cloud's
    check_plan(plan, layout.dim, layout.fingerprint(), FlatView(built.model).base_hashes(), rt.role.name, part=k is not None)
    if split is not None:
        split.handshake(data[spec.clients[0]], task.kind == "causal_lm")
    algo = build_client(cfg)  # the client side of the run's algorithm (FedProx, SCAFFOLD, FedNova; none: FedAvg's)
    link = child_link(rt.up, cfg, rt.placement.flat, "cloud" if rt.placement.flat else "edge", plan.dim, plan.start_round > 1,
                      algo.up_size(plan.dim, True))
    # privacy: clip each client's update (and add its share of distributed noise); secure aggregation masks it
    link = wrap_child(link, cfg, rt.placement, spec.edge, plan.start_round, lambda t: _agg_size(rt.placement, spec, cfg, t),
                      spec, lambda t: round_clients(cfg, rt.placement.num_clients, t))
    saved = RankState(Path(plan.out), rt.role.rank, cfg.checkpoint.keep)
    # state kept across rounds: error-feedback residuals, SCAFFOLD's c_i, a split device's persistent optimiser
    persistent = split is not None and cfg.split.optimizer_state == "persistent"
    has_state = link.feedback is not None or algo.stateful or persistent
    if plan.start_round > 1 and has_state:
        resumed = saved.load(plan.start_round - 1)
        link.load_state_dict({n: v for n, v in resumed.items() if not n.startswith(("client/", "split/"))})
        algo.load_state_dict(unprefixed("client", resumed))
        if split is not None and persistent:
            split.load_state_dict(unprefixed("split", resumed))
    down = np.empty(algo.down_size(plan.dim), dtype=np.float32)  # what the parent sends once per cloud round

    edge_rounds = 1 if rt.placement.flat else cfg.schedule.tau2
    steps = local_steps(cfg, rt.placement.flat)
    cost = StepCost(built.model, cfg, layout_model if k is not None else None)
    params = np.empty(plan.dim, dtype=np.float32)
    delta = np.zeros(plan.dim, dtype=np.float32)
    # which clients train how many steps and contribute what (availability, dropout, deadlines, FedBuff)
    schedule = ClientSchedule(cfg, rt.placement, plan.step_flops, spec.edge, plan.dim)
    attack = attack_hook()  # test/research hook (HIERFED_INJECT_ATTACK): Byzantine clients' corrupted updates
    for t in range(plan.start_round, cfg.schedule.rounds + 1):
        chosen = round_clients(cfg, rt.placement.num_clients, t)
        mine = [c for c in spec.clients if c in chosen]
        held: dict[tuple[int, int], tuple] = {}  # FedBuff: updates trained earlier that arrive later
        for s in range(1, edge_rounds + 1):
            if down.size and s == 1:
                rt.up.bcast(down)
                algo.receive_down(down)
            link.receive(params)
            own = params if mine_idx is None else params[mine_idx]  # the part of the model this rank holds
            loss_sum, started = 0.0, time.perf_counter()
            work: list[dict] = []

            def contribute(c: int, key: tuple[int, int], delta: np.ndarray, scale: float, loss: float, done: dict,
                           t: int = t, s: int = s, work: list = work) -> None:
                nonlocal loss_sum
                weight = len(data[c])  # FedAvg weights a client by its local data size
                delta = attack(c, delta)
                if scale != 1.0:
                    delta = delta * np.float32(scale)
                done["norm"] = float(np.linalg.norm(delta))  # the update as the client sends it: before DP clipping and codecs
                delta, extras = algo.payload(c, delta, weight, done["steps"])
                rng = codec_rng(cfg.seed, t, s, *key[: 1 + bool(key[1])])
                if extras is None:
                    link.add(c, weight, delta, rng)
                else:
                    link.add(c, weight, delta, rng, extras)
                loss_sum += loss * weight
                work.append(done)

            jobs = schedule.jobs(t, s, mine, chosen, steps)
            for job in jobs:
                c, began = job.client, time.perf_counter()
                flat.set(own)
                term = algo.local_term(c)
                loss, _ = trainer.train(data[c], job.steps, job.seed, *(() if term is None else (term,)))
                if mine_idx is None:
                    delta = flat.get() - own
                else:
                    delta[mine_idx] = flat.get() - own
                done = cost.work(c, data[c], job.steps, time.perf_counter() - began)
                if job.now:
                    contribute(c, job.key, delta, job.scale, loss, done)
                else:
                    held[job.key] = (delta.copy(), loss, done)
            for key, scale in schedule.due(t, s, mine, chosen, {j.key for j in jobs if j.now}):
                contribute(key[0], key, held[key][0], scale, *held.pop(key)[1:])
            compute_s = time.perf_counter() - started
            weight = link.send()
            phases = split.phases.take() if split is not None else {}  # split devices: time per phase of the cut
            sent = rt.ledger.take_round()
            share_of_uplink(work, sent)
            rt.up.gather_obj({"loss_sum": loss_sum, "weight": weight, "clients": len(work), "compute_s": compute_s, "phases": phases,
                              "bytes": sent, "work": work})
        if has_state and (t % cfg.checkpoint.every == 0 or t == cfg.schedule.rounds):
            if os.environ.get("HIERFED_INJECT_FAILURE") == f"save:{rt.role.name}:{t}":  # test hook: die late, before saving round t
                time.sleep(8)  # meanwhile the cloud writes its own checkpoint of round t
                raise RuntimeError(f"injected failure before saving round {t}")
            saved.save(t, {**link.state_dict(), **prefixed("client", algo.state_dict()),
                           **(prefixed("split", split.state_dict()) if split is not None and persistent else {})})


def _agg_size(placement, spec, cfg, t: int) -> int:
    """The sampled clients whose updates are summed with this device's in cloud round t: its edge's
    (all of them when flat) — what a client's share of distributed DP noise is divided by."""
    chosen = round_clients(cfg, placement.num_clients, t)
    if spec.edge is None:
        return len(chosen)
    return len(placement.edges[spec.edge].all_clients.intersection(chosen))
