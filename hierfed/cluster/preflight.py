"""Checks before any rank starts (pure: no torch, no MPI): what a topology asks of a run config.

`hierfed run` calls them on the launcher before mpiexec starts, `hierfed topology validate` with
the run config it is given, so a job that cannot run fails in one line, not on a rank mid-run.
"""

from __future__ import annotations

from hierfed.errors import HierfedError
from hierfed.placement.dsconfig import check_edges
from hierfed.privacy import check_privacy


def check_supported(placement, cfg) -> None:
    """What a topology asks that this run config (or this version) cannot run: say so up front,
    in one line. Includes every DeepSpeed edge's batch arithmetic."""
    src = placement.topology.source
    for e in placement.edges:
        if len(e.ranks) > 1 and not e.split_devices and not e.clients:
            raise HierfedError(
                f"{src}: edge '{e.name}' has ranks: {len(e.ranks)} but trains nothing; an edge's ranks shard (DeepSpeed ZeRO) "
                "the upper blocks of its split devices or its own client (train_locally: true), so they would have nothing to do"
            )
        if e.split_devices and e.clients:
            raise HierfedError(f"{src}: edge '{e.name}' has split devices and train_locally: true; this version trains one of the two on an edge")
        if e.clients and cfg.train.batch_size < len(e.ranks):
            raise HierfedError(f"{src}: edge '{e.name}' trains locally on {len(e.ranks)} ranks, so train.batch_size "
                               f"({cfg.train.batch_size}) must be at least {len(e.ranks)} (each rank trains a slice of every batch)")
        if len(e.ranks) > 1 and cfg.deepspeed.enabled is False:
            raise HierfedError(f"{src}: edge '{e.name}' has ranks: {len(e.ranks)}, which needs DeepSpeed (deepspeed.enabled is false)")
    for d in placement.devices:
        if d.split_layers is None:
            continue
        if placement.flat:
            raise HierfedError(f"{src}: device {d.name} has split_layers, but a flat topology has no edge to hold the other blocks")
        if len(d.clients) > 1:
            raise HierfedError(f"{src}: device {d.name} has split_layers and {len(d.clients)} virtual clients; a split device is one client")
    check_aggregation(placement, cfg)
    check_client(placement, cfg)
    check_heterogeneity(placement, cfg)
    check_edges(placement, cfg)
    check_privacy(placement, cfg)


def check_aggregation(placement, cfg) -> None:
    """What a tier's rule cannot do with this topology. A rule that must see every child's update
    (median, trimmed mean, Krum, Multi-Krum, norm clipping: the gathered path) cannot run at an edge
    with split devices (the upper blocks are trained once for all of them: there is no per-client
    update to compare), and Krum / Multi-Krum cannot run a round with fewer than `min_children`
    updates: refused when the fan-out (each edge's clients, the edges, or a flat topology's clients)
    is too small, or, with fixed-size sampling, when a round's sampled clients leave a parent with
    some updates but too few. (Poisson sampling and unreliable devices can still leave too few in a
    round: that round fails naming the rule.) lora_exact needs LoRA factors that train (peft.method
    lora, without ffa_lora). DP noise and secure aggregation with a gathered rule:
    hierfed.privacy.setup."""
    from hierfed.strategy import build_strategy
    from hierfed.strategy.gathered import GatheredStrategy

    src = placement.topology.source
    for tier in ["cloud"] if placement.flat else ["edge", "cloud"]:
        agg = getattr(cfg.aggregation, tier)
        rule = build_strategy(agg)
        if rule.reducible:
            continue
        if agg.name == "lora_exact" and (cfg.peft.method != "lora" or cfg.peft.ffa_lora):
            why = "with ffa_lora, A is frozen and plain fedavg is already exact" if cfg.peft.method == "lora" else \
                f"peft.method is {cfg.peft.method}"
            raise HierfedError(f"aggregation.{tier}.name=lora_exact averages LoRA's B A products, but {why}")
        if tier == "edge":
            split = next((e for e in placement.edges if e.split_devices), None)
            if split is not None:
                raise HierfedError(f"{src}: edge '{split.name}' has split devices, whose upper blocks it trains once for all of them, "
                                   f"so aggregation.edge.name={agg.name} has no per-client update to compare; use a reducible rule there")
        assert isinstance(rule, GatheredStrategy)  # every rule that is not reducible gathers (hierfed.strategy.gathered)
        need = rule.min_children()
        if need <= 1:
            continue
        # the senders each parent of the tier can have: (parent, its clients' groups); a group sends one update
        if tier == "edge":
            parents = [(f"edge '{e.name}'", [{c} for c in sorted(e.all_clients)]) for e in placement.edges]
        elif placement.flat:
            parents = [("the cloud", [{c} for c in range(placement.num_clients)])]
        else:
            parents = [("the cloud", [set(e.all_clients) for e in placement.edges])]
        what = f"aggregation.{tier}.name={agg.name} (krum_f={agg.krum_f}) needs at least {need} updates a round"
        for who, groups in parents:
            if len(groups) < need:
                raise HierfedError(f"{src}: {what}, but {who} has only {len(groups)} "
                                   f"{'edges' if tier == 'cloud' and not placement.flat else 'clients'} below it")
        if cfg.schedule.sampling != "fixed" or cfg.schedule.sampling_fraction >= 1.0:
            continue
        from hierfed.roles.protocol import round_clients  # the same draw as the ranks'

        for t in range(1, cfg.schedule.rounds + 1):
            sampled = round_clients(cfg, placement.num_clients, t)
            for who, groups in parents:
                n = sum(1 for g in groups if g & sampled)
                if 0 < n < need:
                    raise HierfedError(f"{src}: {what}, but in round {t} {who} gets {n} (schedule.client_fraction="
                                       f"{cfg.schedule.client_fraction} samples too few of its clients)")


def check_client(placement, cfg) -> None:
    """What the run's client algorithm (client.algorithm; schedule.normalise: fednova) cannot run
    with, in one line (docs/aggregation.md, "Client algorithms"). The client side runs on device
    ranks only; algorithms whose extras travel in the SUM-reduced buffer (scaffold, fednova) need
    the uncompressed, reducible, unmasked uplink that carries that buffer."""
    from hierfed.comm.codecs import parse_codec
    from hierfed.strategy import STRATEGIES
    from hierfed.strategy.client import build_client

    algo = build_client(cfg)
    if algo.name == "none":
        return
    what = f"client.algorithm={algo.name}" if cfg.client.algorithm != "none" else "schedule.normalise=fednova"
    src = placement.topology.source
    for e in placement.edges:
        if e.split_devices or e.clients:
            kind = "split devices" if e.split_devices else "train_locally: true"
            raise HierfedError(f"{src}: edge '{e.name}' has {kind}; {what} runs on device ranks only in this version")
    if algo.up_size(1, True) == 0:
        return  # FedProx: a local term only, nothing else travels
    tiers = ["cloud"] if placement.flat else ["edge", "cloud"]
    for tier in tiers:
        name = getattr(cfg.aggregation, tier).name
        if not STRATEGIES[name].reducible:
            raise HierfedError(f"{what} sends extra values in the SUM-reduced contribution; aggregation.{tier}.name={name} "
                               "aggregates gathered updates, which do not carry them")
    c = cfg.compression
    for key in ("device_up",) if placement.flat else ("device_up", "edge_up"):
        if not parse_codec(getattr(c, key)).is_identity:
            raise HierfedError(f"{what} sends extra values in the SUM-reduced contribution; compression.{key}={getattr(c, key)} "
                               "sends encoded updates instead (use identity)")
    if cfg.privacy.dp or cfg.privacy.secagg:
        raise HierfedError(f"{what} sends extra values beside the model delta, which privacy (clipping, noise, secure aggregation) "
                           "does not cover; turn privacy off or use client.algorithm none or fedprox")
    if algo.name == "scaffold" and cfg.schedule.edge_mode == "fedbuff":
        raise HierfedError("client.algorithm=scaffold with schedule.edge_mode=fedbuff: stale updates would apply control "
                           "variates of an older model; use edge_mode: sync")


def check_resolved_split(placement, cfg, ks: dict[int, int | None]) -> None:
    """After `split_layers: auto` is resolved (`placement.plan.split_plan`, rank -> k or None): an
    edge group left with nothing to train, and every DeepSpeed edge's batch arithmetic with the
    split devices it really serves."""
    src = placement.topology.source
    for e in placement.edges:
        if e.split_devices and not e.served(ks) and len(e.ranks) > 1 and not e.clients:
            raise HierfedError(
                f"{src}: edge '{e.name}' has ranks: {len(e.ranks)}, but the whole model fits each of its split_layers: auto "
                "devices, so they train whole and its ranks would have nothing to do; give it ranks: 1 or an integer split_layers")
    check_edges(placement, cfg, ks)


def check_edge_clients(placement, cfg, task) -> None:
    """An edge that trains its own client on G ranks cuts every batch into G slices: its client
    needs at least G examples."""
    from hierfed.data import partition

    edges = [e for e in placement.edges if e.clients and len(e.ranks) > 1]
    if not edges:
        return
    shards = partition(task.train, placement.num_clients, cfg.data.partition, alpha=cfg.data.alpha, seed=cfg.data.seed)
    for e in edges:
        n = len(shards[e.clients[0]])
        if n < len(e.ranks):
            raise HierfedError(f"{placement.topology.source}: edge '{e.name}' trains client {e.clients[0]} on {len(e.ranks)} ranks, "
                               f"but the client has {n} example{'s' * (n != 1)} (each rank needs one per batch)")


def check_heterogeneity(placement, cfg) -> None:
    """What stragglers and asynchrony (schedule.straggler, edge_mode; docs/heterogeneity.md) cannot
    run with, and FedBuff's K against each edge's clients."""
    s, src = cfg.schedule, placement.topology.source
    if not s.timed:
        return
    what = "schedule.edge_mode=fedbuff" if s.edge_mode == "fedbuff" else f"schedule.straggler={s.straggler}"
    if s.edge_mode == "fedbuff" and placement.flat:
        raise HierfedError(f"{src}: {what} runs at edges; a flat topology has none (use straggler: drop or partial)")
    for e in placement.edges:
        if e.split_devices or e.clients:
            kind = "split devices" if e.split_devices else "train_locally: true"
            raise HierfedError(f"{src}: edge '{e.name}' has {kind}; {what} is not supported with them in this version")
        n = len(e.all_clients)
        if s.buffer_k is not None and s.buffer_k > n:
            raise HierfedError(f"{src}: schedule.buffer_k={s.buffer_k} is larger than edge '{e.name}'s {n} clients: its buffer would never fill")


def check_deadline(placement, cfg, task) -> None:
    """A fixed schedule.deadline that no client can meet (every update would always be discarded):
    each client's download + one local step (partial; tau1 steps for drop) + upload on the model
    clock, from its FLOPs per step (the clients' tokenised shards on the model's meta skeleton)."""
    s = cfg.schedule
    if s.deadline is None or s.straggler == "wait":
        return
    from hierfed.model import FlatView, load_tokenizer
    from hierfed.placement.memory import skeleton
    from hierfed.roles.hetero import ClientSchedule, client_step_flops
    from hierfed.roles.protocol import local_steps

    model = skeleton(cfg, task.kind, task.num_labels)
    flops = client_step_flops(cfg, task, model, load_tokenizer(cfg.model), placement.num_clients)
    dim = FlatView(model).dim
    need = 1 if s.straggler == "partial" else local_steps(cfg, placement.flat)
    best = min(t.finish(need) for e in ([None] if placement.flat else range(len(placement.edges)))
               for t in ClientSchedule(cfg, placement, flops, e, dim).timing.values())
    if best > s.deadline:
        raise HierfedError(f"schedule.deadline={s.deadline:g} s: no client can meet it (the fastest needs {best:.3g} s on the model "
                           f"clock for {need} local step{'s' * (need > 1)} and its transfers); every update would be discarded")
