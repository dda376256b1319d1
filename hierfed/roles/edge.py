"""An edge rank: partial aggregation of its devices every edge round, one update to the cloud per
cloud round. A plain edge works on flat vectors only (no model, no torch import); an edge with split
devices trains their upper blocks (EdgeSplit), one that trains locally its own client (EdgeLocal),
on its own rank or sharded over its ranks with DeepSpeed ZeRO."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import numpy as np

from hierfed.comm.channel import bcast_object, wait
from hierfed.comm.ledger import merge
from hierfed.placement.dsconfig import use_deepspeed
from hierfed.privacy import wrap_parent, wrap_strategy, wrap_up
from hierfed.roles.hetero import ClientSchedule
from hierfed.roles.protocol import aggregation_round, bind_layout, child_link, codec_rng, parent_link, prefixed, round_clients, unprefixed
from hierfed.runtime.checkpoint import RankState
from hierfed.strategy import build_strategy
from hierfed.strategy.client import build_client


def run(rt, cfg) -> None:
    if rt.role.group_index > 0:
        return run_follower(rt, cfg)
    strategy = wrap_strategy(build_strategy(cfg.aggregation.edge), cfg, "edge", False, rt.role.rank)  # DP noise at the edges
    plan = rt.up.bcast_obj()
    rt.down.bcast_obj(plan)
    if rt.edge_group.Get_size() > 1:
        bcast_object(rt.edge_group, plan, True, rt.poll)
    algo = build_client(cfg)
    tier = algo.tier(plan.dim, True)  # the edge's side of the client algorithm (SCAFFOLD: its control variate)
    bind_layout(strategy, plan.manifest)  # lora_exact: where the LoRA factors are
    # adaptive clipping with the noise at the cloud: the cloud's C comes down `up`, the devices' count goes up it (a relay)
    up, relay = wrap_up(child_link(rt.up, cfg, False, "cloud", plan.dim, plan.start_round > 1, algo.up_size(plan.dim, False)), cfg, rt.placement)
    down = wrap_parent(parent_link(rt.down, cfg, False, "edge", plan.dim, algo.up_size(plan.dim, True)), cfg, rt.placement,
                       rt.role.edge, plan.start_round, relay or strategy)  # SecAgg; adaptive clip: C (the edge's, or the cloud's relayed)
    from_cloud = np.empty(algo.down_size(plan.dim), dtype=np.float32)  # SCAFFOLD: the cloud's control variate
    # The edge's own state, in its rank state file (never through the cloud: FedAvgM's velocity is
    # model-sized): its strategy's, its client-algorithm tier's (SCAFFOLD's c_e), the uplink's
    # error-feedback residual, what the devices hold (codec downlink), its split trainer's. Every
    # edge leader writes one at each checkpoint.
    saved = RankState(Path(plan.out), rt.role.rank, cfg.checkpoint.keep)
    ks = split_ks(rt, cfg)
    resumed_state = saved.load(plan.start_round - 1) if plan.start_round > 1 else {}
    strategy.load_state_dict(unprefixed("strategy", resumed_state))
    tier.load_state_dict(unprefixed("client", resumed_state))
    up.load_state_dict(unprefixed("up", resumed_state))
    down.load_state_dict(unprefixed("down", resumed_state))
    me = rt.placement.edges[rt.role.edge]
    my_clients = me.all_clients
    trainer = edge_trainer(rt, cfg, plan, unprefixed("split", resumed_state), ks)  # None: the edge only aggregates

    schedule = ClientSchedule(cfg, rt.placement, plan.step_flops, rt.role.edge, plan.dim)  # what its clients do (roles/hetero.py)
    params = np.empty(plan.dim, dtype=np.float32)
    local = np.empty(plan.dim, dtype=np.float64)  # the edge's master copy; aggregation_round updates it in place
    for t in range(plan.start_round, cfg.schedule.rounds + 1):
        if from_cloud.size:
            rt.up.bcast(from_cloud)
            tier.set_down(from_cloud)
        up.receive(params)
        sampled = my_clients.intersection(round_clients(cfg, rt.placement.num_clients, t))
        tier.fraction = len(sampled) / max(1, len(my_clients))
        weight_sum, rows = 0.0, []
        for s in range(1, cfg.schedule.tau2 + 1):
            started = time.perf_counter()
            rng = codec_rng(cfg.seed, t, s, rt.role.rank, 1)
            # the edge's own client gets no message, nor do clients that are unreachable (hierfed.sim.behaviour)
            receivers = len(sampled - set(me.clients)) - schedule.unreachable(t, s, sampled)
            if trainer is None and s == 1:  # the devices get `params` as received; the master copy is made while they train
                local, weight, telemetry, agg_s = aggregation_round(down, local, strategy, receivers=receivers, rng=rng, tier=tier,
                                                                    sent=params, while_children_work=partial(np.copyto, local, params))
            elif trainer is None:
                local, weight, telemetry, agg_s = aggregation_round(down, local, strategy, receivers=receivers, rng=rng, tier=tier,
                                                                    send_down=False)
            else:  # the edge trains while its devices do, and adds its own update to theirs
                if s == 1:
                    np.copyto(local, params)
                start = local.astype(np.float32)
                local, weight, telemetry, agg_s = aggregation_round(
                    down, local, strategy, receivers=receivers, rng=rng,
                    while_children_work=partial(trainer.round, start, t, s, sampled), add_own=trainer.add_own,
                )
                telemetry = telemetry + trainer.telemetry()
            weight_sum += weight
            w = sum(d["weight"] for d in telemetry)
            rows.append({
                "round": t, "edge_round": s, "tier": "edge", "edge": rt.role.name,
                "loss": sum(d["loss_sum"] for d in telemetry) / w if w else None,
                "clients": sum(d["clients"] for d in telemetry),
                "samples": w,
                "receivers": receivers,  # clients the edge's broadcast went to
                **getattr(down, "report", dict)(),  # secure aggregation: members, survivors, t, failure
                **getattr(strategy, "report", dict)(),  # a gathered rule: what it saw and kept ("aggregation")
                "work": [x for d in telemetry for x in d.get("work", ())],  # per trained client: steps, FLOPs, seconds, uplink bytes
                "bytes": merge([d["bytes"] for d in telemetry] + [rt.ledger.take_round()]),
                "seconds": {"wall": time.perf_counter() - started, "compute": max(d["compute_s"] for d in telemetry), "aggregate": agg_s,
                            **getattr(down, "row_seconds", dict)(),  # secure aggregation: the protocol's time
                            **(trainer.row_seconds(telemetry) if trainer else {})},
                **schedule.row(t, s, sampled),  # sampled, available, dropped, late, ...; span_s for the simulated clock
            })
        # Up to the cloud: the edge's whole change this cloud round, weighted by the samples behind it.
        if weight_sum > 0:  # the update is local - params; the master copy is spent until the next round
            extras = tier.up_extras(weight_sum) if algo.up_size(plan.dim, False) else None
            up.add(rt.role.edge, weight_sum, local, codec_rng(cfg.seed, t, 0, rt.role.rank, 2), extras, base=params)
        up.send()
        rt.up.gather_obj({"rows": rows, "bytes": rt.ledger.take_round()})  # telemetry: small, pickled
        if t % cfg.checkpoint.every == 0 or t == cfg.schedule.rounds:
            own = trainer.save(t) if trainer else None  # None: nothing of the trainer's to keep
            saved.save(t, {**prefixed("strategy", strategy.state_dict()), **prefixed("client", tier.state_dict()), **prefixed("up", up.state_dict()),
                           **prefixed("down", down.state_dict()), **prefixed("split", own or {})})
    if trainer:
        trainer.close()


def edge_trainer(rt, cfg, plan, resumed: dict[str, np.ndarray], ks: dict[int, int | None]):
    """What this edge trains besides aggregating: its split devices' upper stage (EdgeSplit), its
    own client (EdgeLocal; the two are never combined, see hierfed.cluster.preflight), or nothing (None).
    `ks`: the split devices' resolved k (`split_ks`)."""
    if split_here(rt, ks):
        return EdgeSplit(rt, cfg, plan, resumed, ks)
    return EdgeLocal(rt, cfg, plan) if rt.placement.edges[rt.role.edge].clients else None


def close_group(rt, trainer) -> None:
    """End the edge group's DeepSpeed engine and torch.distributed process group before MPI
    finalises, all ranks of the group together: a rank that tears its group down (or exits) while
    another still uses it makes gloo's threads abort the other ("terminate called without an
    active exception")."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    group = rt.edge_group
    wait(group.Ibarrier(), rt.poll)  # every rank is done with the group's collectives
    engine = getattr(trainer, "engine", None)
    if engine is not None:
        engine.destroy()  # ZeRO's hooks and optimiser state, before the group they use goes
    dist.barrier()  # ... and with the work it queued on the group's own threads
    dist.destroy_process_group()
    wait(group.Ibarrier(), rt.poll)  # ... and no rank leaves while another still tears down


def split_ks(rt, cfg) -> dict[int, int | None]:
    """Split device rank -> its resolved k (`placement.plan.split_plan`; None where `auto` found the
    whole model fits); empty when no device of this edge has split_layers (nothing to resolve)."""
    if not rt.placement.edges[rt.role.edge].split_devices:
        return {}
    from hierfed.placement.memory import task_of
    from hierfed.placement.plan import split_plan

    return split_plan(rt.placement, cfg, *task_of(cfg))


def split_here(rt, ks: dict[int, int | None]) -> bool:
    """The edge serves split devices: some device of it has a resolved k (`split_ks`)."""
    return bool(rt.placement.edges[rt.role.edge].served(ks))


def run_follower(rt, cfg) -> None:
    """A non-leader rank of a multi-rank edge: a shard of the DeepSpeed engine (the upper stage of
    its split devices, or its own client), in lockstep with its leader's edge rounds."""
    plan = bcast_object(rt.edge_group, None, False, rt.poll)
    saved = RankState(Path(plan.out), rt.role.rank, cfg.checkpoint.keep)
    ks = split_ks(rt, cfg)
    resumed = saved.load(plan.start_round - 1) if plan.start_round > 1 and split_here(rt, ks) else {}
    trainer = edge_trainer(rt, cfg, plan, unprefixed("split", resumed), ks)
    clients = rt.placement.edges[rt.role.edge].all_clients
    for t in range(plan.start_round, cfg.schedule.rounds + 1):
        sampled = clients.intersection(round_clients(cfg, rt.placement.num_clients, t))
        for s in range(1, cfg.schedule.tau2 + 1):
            trainer.round(None, t, s, sampled)
        if t % cfg.checkpoint.every == 0 or t == cfg.schedule.rounds:
            own = trainer.save(t)  # collective over the group (DeepSpeed's checkpoint), on every rank
            if own is not None:
                saved.save(t, prefixed("split", own))
    trainer.close()


def _build_model(rt, cfg, plan):
    """The model of an edge that trains, with its task and every client's shard: built as every
    rank builds it and checked against the cloud's plan before anything is pruned."""
    from hierfed.data import load_data, partition
    from hierfed.model import FlatView, build_model
    from hierfed.roles.protocol import check_plan
    from hierfed.training import configure_threads, torch_device

    configure_threads(cfg.runtime.threads)
    task = load_data(cfg.data)
    shards = partition(task.train, rt.placement.num_clients, cfg.data.partition, alpha=cfg.data.alpha, seed=cfg.data.seed)
    device = torch_device(cfg.runtime.device)
    # Under ZeRO-3 the model stays on the CPU: DeepSpeed moves each parameter's shard to `device`
    # (hierfed.placement.zero.initialize), so no GPU of the group ever holds the whole model.
    sharded = use_deepspeed(cfg, len(rt.placement.edges[rt.role.edge].ranks)) and cfg.deepspeed.zero_stage == 3
    built = build_model(cfg.model, cfg.peft, task.kind, task.num_labels, cfg.seed, "cpu" if sharded else device)
    whole = FlatView(built.model)
    check_plan(plan, whole.dim, whole.fingerprint(), whole.base_hashes(), rt.role.name)
    return task, shards, device, built, whole


def _join_deepspeed_group(rt, cfg, device) -> None:
    """This edge's torch.distributed group (the leader picks address and port): NCCL on GPUs, gloo
    on CPUs unless deepspeed.backend says otherwise."""
    from hierfed.placement.zero import init_group

    backend = cfg.deepspeed.backend if cfg.deepspeed.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    init_group(rt.edge_group, rt.role.group_index == 0, backend, device)


def _from_leader(rt, buf: np.ndarray) -> None:
    """The leader's `buf` to every rank of a multi-rank edge. Followers wait here between rounds,
    as runtime.wait says (a blocking Bcast would spin)."""
    if rt.edge_group.Get_size() > 1:
        wait(rt.edge_group.Ibcast(buf, root=0), rt.poll)


class EdgeSplit:
    """The edge's half of split placement: the upper stage it trains for its split devices, on one
    rank (plain torch) or sharded over the edge's ranks (DeepSpeed ZeRO)."""

    def __init__(self, rt, cfg, plan, resumed: dict[str, np.ndarray], ks: dict[int, int | None]) -> None:
        from hierfed.model.cut import prune_for_edge
        from hierfed.placement.link import SplitServer, global_index

        self.rt, self.cfg, self.out = rt, cfg, Path(plan.out)
        task, shards, device, built, whole = _build_model(rt, cfg, plan)
        me = rt.placement.edges[rt.role.edge]
        split_devices = me.served(ks)
        k = min(c for c in (ks[d.rank] for d in split_devices) if c is not None)  # one upper stage: split_plan gave them all the same k (served: none is None)
        # split device rank -> (client, weight); the ones this rank serves (EdgeSpec.servers)
        self.devices = {d.rank: (d.clients[0], len(shards[d.clients[0]])) for d in split_devices}
        self.mine = {d for d, r in me.servers(ks).items() if r == rt.role.rank}
        prune_for_edge(built.model, k)
        poll = rt.poll
        if use_deepspeed(cfg, len(me.ranks)):
            from hierfed.placement.zero import DeepSpeedServer

            _join_deepspeed_group(rt, cfg, device)
            self.server: SplitServer = DeepSpeedServer(rt.split_comm, built.model, task.kind, k, cfg, rt.ledger, poll,
                                          rt.edge_group, rt.role.group_index == 0, len(split_devices), me.name, device)
        else:
            self.server = SplitServer(rt.split_comm, built.model, task.kind, k, cfg, rt.ledger, poll)
        self.index = global_index(whole, self.server.flat)
        self.server.handshake(sorted(self.mine))
        self.server.make_optimizer()
        if plan.start_round > 1:
            self.server.load_state(self.out, plan.start_round - 1, resumed)
        self.weight = 0.0
        self.update: np.ndarray | None = None

    def round(self, params: np.ndarray | None, t: int, s: int, sampled: set[int]) -> None:
        """One edge round of the upper stage: load the edge's parameters, serve, read the update.
        The leader passes the edge's parameters; followers receive them from it."""
        from hierfed.seeding import derive_seed

        start = np.empty(self.server.flat.dim, dtype=np.float32) if params is None else params[self.index].copy()
        _from_leader(self.rt, start)
        self.server.load(start)
        active = {r: derive_seed(self.cfg.seed, t, s, c) for r, (c, _) in self.devices.items() if c in sampled}
        weights = {r: float(self.devices[r][1]) for r in active}  # FedAvg weights a client by its samples
        self.weight = sum(weights.values())
        if active:
            shares = {r: w / self.weight for r, w in weights.items()}
            self.server.serve({r: seed for r, seed in active.items() if r in self.mine}, self.cfg.schedule.tau1, shares)
        self.update = self.server.update(weights)

    def add_own(self, reduced: np.ndarray) -> None:
        """The split devices' upper-stage updates, each weighted by its device's samples, into the edge's sum."""
        if self.weight:
            reduced[self.index] += self.update

    def save(self, t: int) -> dict[str, np.ndarray]:
        return self.server.save_state(self.out, t)

    def close(self) -> None:
        close_group(self.rt, self.server)

    def telemetry(self) -> list[dict]:
        return []  # the split devices report their own clients

    def row_seconds(self, telemetry: list[dict]) -> dict:
        """This edge round's split-link times for the edge row: the edge's busy time (all but waiting
        for activations), its phases, and the split devices' mean phases (from their telemetry)."""
        edge = self.server.phases.take()
        devices = [d["phases"] for d in telemetry if d.get("phases")]
        mean = {k: sum(p.get(k, 0.0) for p in devices) / len(devices) for k in sorted({k for p in devices for k in p})}
        return {"edge_busy": sum(v for k, v in edge.items() if k != "wait_activation"), "edge_phases": edge, "device_phases": mean}


class EdgeLocal:
    """The edge's own client (`train_locally: true`): the whole model on the edge's ranks, trained
    like any client each edge round (from the edge's parameters, tau1 steps, a fresh optimiser) —
    on one rank with plain torch, or data-parallel over the edge group under DeepSpeed ZeRO. Its
    weighted update joins the edge's sum as a device's would."""

    def __init__(self, rt, cfg, plan) -> None:
        from hierfed.training import LocalTrainer, tokenize

        self.rt, self.cfg = rt, cfg
        me = rt.placement.edges[rt.role.edge]
        self.client = me.clients[0]
        task, shards, device, built, flat = _build_model(rt, cfg, plan)
        self.data = tokenize(built.tokenizer, [task.train[i] for i in shards[self.client]], task.kind, cfg.model.max_length)
        if use_deepspeed(cfg, len(me.ranks)):
            from hierfed.placement.zero import DeepSpeedLocal

            _join_deepspeed_group(rt, cfg, device)
            self.trainer: DeepSpeedLocal | LocalTrainer = DeepSpeedLocal(built.model, cfg, rt.edge_group, me.name, device)
            self.load, self.get = self.trainer.load, self.trainer.get
        else:
            self.trainer = LocalTrainer(built.model, cfg.train)
            self.load, self.get = flat.set, flat.get
        self.dim = flat.dim
        self.start: np.ndarray | None = None
        self.new: np.ndarray | None = None
        self.weight, self.loss, self.compute_s = 0.0, 0.0, 0.0
        from hierfed.placement.memory import skeleton
        from hierfed.roles.work import StepCost

        self.cost = StepCost(skeleton(cfg, task.kind, task.num_labels), cfg)  # the whole model (ZeRO-3 shards the real one)
        self.work: dict = {}

    def round(self, params: np.ndarray | None, t: int, s: int, sampled: set[int]) -> None:
        """Train the client if it is sampled this round. The leader passes the edge's parameters;
        followers receive them from it."""
        from hierfed.seeding import derive_seed

        self.weight, self.loss, self.compute_s = 0.0, 0.0, 0.0
        if self.client not in sampled:
            return
        if params is None:  # a follower: the leader's parameters come next
            params = np.empty(self.dim, dtype=np.float32)
        _from_leader(self.rt, params)
        began = time.perf_counter()
        self.start = params
        self.load(params)
        self.loss, _ = self.trainer.train(self.data, self.cfg.schedule.tau1, derive_seed(self.cfg.seed, t, s, self.client))
        self.new = self.get()
        self.weight = float(len(self.data))  # FedAvg weights a client by its local data size
        self.compute_s = time.perf_counter() - began
        self.work = {**self.cost.work(self.client, self.data, self.cfg.schedule.tau1, self.compute_s), "edge": self.rt.role.name, "up": 0}

    def add_own(self, reduced: np.ndarray) -> None:
        """The client's contribution [w * delta, w] into the edge's sum, computed in float32 exactly
        as a device computes the one it sends."""
        if self.weight:
            from hierfed.strategy import Strategy

            assert self.new is not None and self.start is not None  # round() set both when it set the weight
            reduced += Strategy.contribution(self.new - self.start, self.weight)

    def save(self, t: int) -> None:
        return None  # a client starts every round afresh: nothing to checkpoint

    def row_seconds(self, telemetry: list[dict]) -> dict:
        return {}

    def telemetry(self) -> list[dict]:
        """What a device would report for this client (the edge's rows count it the same way)."""
        if not self.weight:
            return []
        return [{"loss_sum": self.loss * self.weight, "weight": self.weight, "clients": 1, "compute_s": self.compute_s, "bytes": {},
                 "work": [self.work]}]

    def close(self) -> None:
        close_group(self.rt, self.trainer)
