"""The cloud rank: global aggregation each cloud round, evaluation, checkpoints and the results.

The cloud evaluates (and checkpoints) the model of round t while its children already train
round t+1: the broadcast goes first, the bookkeeping runs while the children work.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

import numpy as np

from hierfed.comm.ledger import merge
from hierfed.data import load_data
from hierfed.model import FlatView, build_model
from hierfed.privacy import budget, wrap_parent, wrap_strategy
from hierfed.roles.hetero import ClientSchedule, client_step_flops
from hierfed.roles.protocol import Plan, aggregation_round, bind_layout, codec_rng, parent_link, prefixed, round_clients, unprefixed
from hierfed.runtime.checkpoint import Checkpoints, State
from hierfed.runtime.results import RunLog
from hierfed.sim.clock import Rates, round_times
from hierfed.strategy import build_strategy
from hierfed.strategy.client import build_client
from hierfed.training import LocalTrainer, configure_threads, tokenize, torch_device


def _round_row(t: int, telemetry: list, flat_topology: bool, agg_s: float, log: RunLog, receivers: int | None) -> tuple[dict, dict]:
    """The cloud row of round t (without eval) and its raw byte counts; writes the edge rows."""
    if flat_topology:  # children are devices
        weight = sum(d["weight"] for d in telemetry)
        loss = sum(d["loss_sum"] for d in telemetry) / weight if weight else None
        clients = sum(d["clients"] for d in telemetry)
        compute = max(d["compute_s"] for d in telemetry)
        raw = merge([d["bytes"] for d in telemetry])
        edge_agg = 0.0
        work = [x for d in telemetry for x in d.get("work", ())]
    else:  # children are edges, each with a row per edge round
        rows = [r for d in telemetry for r in d["rows"]]
        parts = [d["bytes"] for d in telemetry]  # each edge's uplink to the cloud
        for r in rows:
            parts.append(r.pop("bytes"))  # the edge's device traffic in that edge round
            log.write(r, parts[-1])
        raw = merge(parts)
        weight = sum(r["samples"] for r in rows)
        loss = sum(r["loss"] * r["samples"] for r in rows if r["loss"] is not None) / weight if weight else None
        last = max(r["edge_round"] for r in rows)
        clients = sum(r["clients"] for r in rows if r["edge_round"] == last)
        # Edges run side by side: the critical path is the slowest edge's sum over its edge rounds.
        edges = {r["edge"] for r in rows}
        compute = max(sum(r["seconds"]["compute"] for r in rows if r["edge"] == e) for e in edges)
        edge_agg = max(sum(r["seconds"]["aggregate"] for r in rows if r["edge"] == e) for e in edges)
    row = {"round": t, "edge_round": None, "tier": "cloud", "loss": loss, "clients": clients, "samples": weight,
           "seconds": {"compute": compute, "aggregate": agg_s + edge_agg}}
    if flat_topology:  # the clients' work, for the simulated clock (hierarchical: in the edge rows)
        row.update(receivers=receivers, work=work)
    return row, raw


def run(rt, cfg) -> None:
    out = Path(rt.out)
    configure_threads(cfg.runtime.threads)
    task = load_data(cfg.data)
    built = build_model(cfg.model, cfg.peft, task.kind, task.num_labels, cfg.seed, torch_device(cfg.runtime.device))
    flat = FlatView(built.model)
    evaluator = LocalTrainer(built.model, cfg.train)
    eval_data = tokenize(built.tokenizer, task.eval, task.kind, cfg.model.max_length)
    eval_groups = np.array([task.groups.index(e.group) for e in task.eval]) if task.groups else None  # per-group eval
    strategy = wrap_strategy(build_strategy(cfg.aggregation.cloud), cfg, "cloud", rt.placement.flat, rt.role.rank)  # DP noise at the cloud
    algo = build_client(cfg)
    tier = algo.tier(flat.dim, rt.placement.flat)  # the cloud's side of the client algorithm (SCAFFOLD: its control variate)
    _, accountant = budget(cfg, rt.placement)  # None without DP noise
    ckpts = Checkpoints(out / "checkpoints", cfg.checkpoint.keep)
    meta = {"fingerprint": flat.fingerprint(), "seed": cfg.seed, "topology": rt.placement.topology.name}

    if rt.resume:
        state = ckpts.load_latest(flat.dim, flat.fingerprint())
        strategy.load_state_dict(unprefixed("strategy", state.cloud_state))
        tier.load_state_dict(unprefixed("client", state.cloud_state))
        start, params = state.round + 1, state.params
    else:
        start, params = 1, flat.get().astype(np.float64)  # float64 master copy
    log = RunLog(out, start - 1 if rt.resume else None, cfg.runtime.progress)
    (out / "config.yaml").write_text(rt.config_text)
    step_flops = client_step_flops(cfg, task, built.model, built.tokenizer, rt.placement.num_clients)  # None unless the model clock decides (roles/hetero.py)
    rt.down.bcast_obj(Plan(start, flat.dim, flat.fingerprint(), flat.base_hashes(), str(out), step_flops, manifest=flat.manifest()))
    bind_layout(strategy, flat.manifest())  # lora_exact: where the LoRA factors are
    schedule = ClientSchedule(cfg, rt.placement, step_flops, None, flat.dim) if rt.placement.flat else None
    # adaptive clipping with the noise here: C down to the children and their clipped-count up (edges relay their devices')
    link = wrap_parent(parent_link(rt.down, cfg, rt.placement.flat, "cloud", flat.dim, algo.up_size(flat.dim, rt.placement.flat)), cfg,
                       rt.placement, None, start, strategy)
    if rt.resume:
        link.load_state_dict(unprefixed("link", state.cloud_state))
    began = time.perf_counter()
    rates = Rates.from_config(cfg.sim)

    def finish(row: dict, raw: dict, params: np.ndarray, cloud_state: dict) -> None:
        """Evaluate and checkpoint a finished round, then write its row."""
        t0 = time.perf_counter()
        last = row["round"] == cfg.schedule.rounds
        if row["round"] % cfg.schedule.eval_every == 0 or last:  # round 0 included: where learning starts
            flat.set(params)
            row.update(evaluator.evaluate(eval_data, task.kind, cfg.schedule.eval_batch_size, eval_groups, task.groups))
        if row["round"] > 0 and (last or row["round"] % cfg.checkpoint.every == 0):
            ckpts.save(State(row["round"], params, cloud_state), built.model, flat, meta)  # each edge saves its own (roles/edge.py)
            unconfirmed.append(row["round"])
        row["seconds"]["eval"] = time.perf_counter() - t0
        row["elapsed_s"] = time.perf_counter() - began
        log.add_bytes(row, raw)  # before pricing: the round's own cloud-link bytes are on its critical path
        sim = round_times(log.rows + [row], rt.placement, rates, flat.dim)[-1]  # the modelled cluster's time (hierfed.sim.clock)
        row["sim_s"], row["sim_clock_s"] = sim.seconds, sim.clock
        log.write(row)

    unconfirmed: list[int] = []  # checkpoints written here whose rank states may still be on their way to disk
    pending: tuple[dict, dict, np.ndarray, dict] | None = None  # the last round's finish(*pending), run during the next
    if start == 1:  # round 0: the untrained model, so the log shows where learning starts
        pending = ({"round": 0, "edge_round": None, "tier": "cloud", "loss": None, "seconds": {}}, rt.ledger.take_round(), params, {})
    for t in range(start, cfg.schedule.rounds + 1):
        started = time.perf_counter()
        job = pending
        # Flat: the broadcast stands for one copy per sampled client; hierarchical: one per edge.
        receivers = len(round_clients(cfg, rt.placement.num_clients, t)) if rt.placement.flat else None
        tier.fraction = _fraction(cfg, rt.placement, t)
        # Updates params in place: by then finish(*job) has evaluated and saved the last round's model.
        params, _weight, telemetry, agg_s = aggregation_round(
            link, params, strategy, receivers, codec_rng(cfg.seed, t, 0, rt.role.rank, 1), while_children_work=partial(finish, *job) if job else None,
            tier=tier,
        )
        # Round t's contributions came from every rank after it had saved its state of every earlier
        # round: the checkpoints before t are complete now (the one of t - 1 was written meanwhile).
        if earlier := [r for r in unconfirmed if r < t]:
            ckpts.confirm(max(earlier))
            unconfirmed[:] = [r for r in unconfirmed if r >= t]
        if os.environ.get("HIERFED_INJECT_FAILURE") == f"cloud:{t}":  # test hook: the job dies in round t, round t-1 saved
            raise RuntimeError(f"injected failure in round {t}")
        row, raw = _round_row(t, telemetry, rt.placement.flat, agg_s, log, receivers)
        row.update(getattr(strategy, "report", dict)())  # a gathered rule: what it saw and kept ("aggregation")
        if accountant is not None:
            row["epsilon"] = accountant.epsilon(t)  # at privacy.delta, after this round
            row.update(getattr(link, "report", dict)())  # adaptive clipping at the cloud: the clip norm C of this round
        if schedule is not None:  # flat: what the clients did (sampled, available, dropped, late, ...)
            row.update(schedule.row(t, 1, round_clients(cfg, rt.placement.num_clients, t)))
        raw = merge([raw, rt.ledger.take_round()])  # the cloud's own sends this round
        row["seconds"]["round"] = time.perf_counter() - started
        cloud_state = {**prefixed("strategy", strategy.state_dict()), **prefixed("link", link.state_dict()),
                       **prefixed("client", tier.state_dict())}  # as of round t
        pending = (row, raw, params, cloud_state)
    if pending:
        finish(*pending)
    if unconfirmed:  # the last round's: complete once every rank has reached the end-of-run gather
        last_saved = max(unconfirmed)
        rt.when_all_ranks_done = lambda: ckpts.confirm(last_saved)

    if task.kind == "causal_lm":  # a few greedy generations from the final model (flat holds its parameters)
        from hierfed.training.samples import write_samples

        write_samples(built.model, built.tokenizer, task.eval, out / "samples.txt")
    truncated = {}  # instruction data: conversations that truncation shortened (hierfed.training.instruct)
    if task.kind == "causal_lm" and task.train[0].messages is not None:
        from hierfed.training.instruct import truncation

        truncated = {"truncated": {s: truncation(built.tokenizer, getattr(task, s), cfg.model.max_length) for s in ("train", "eval")}}
    rt.summary = log.summary({
        **truncated,
        "topology": rt.placement.topology.name,
        "world_size": rt.placement.world_size,
        "clients": rt.placement.num_clients,
        "trainable_params": flat.dim,
        "wait": rt.wait_reason,  # how ranks wait for messages (runtime.wait, resolved)
        "total_params": built.base_params,  # the model without its adapter: full fine-tuning's vector
        "out": str(out),
        **({"privacy": _privacy_summary(cfg, accountant, rt.config_text)} if cfg.privacy.dp else {}),
    })


def _fraction(cfg, placement, t: int) -> float:
    """The cloud's children that take part in round t: sampled clients of all (flat), or edges with
    a sampled client of all edges (SCAFFOLD's control variate moves by this share of the mean)."""
    chosen = round_clients(cfg, placement.num_clients, t)
    if placement.flat:
        return len(chosen) / placement.num_clients
    return sum(bool(e.all_clients & chosen) for e in placement.edges) / len(placement.edges)


def _privacy_summary(cfg, accountant, asked: str) -> dict:
    """summary.json's privacy entry: the guarantee the run ended with (ε at δ), and whether
    privacy.target_epsilon stopped it before the rounds `asked` (the run config as given) wanted."""
    import yaml

    p = cfg.privacy
    out = {"clip": p.clip, "noise_multiplier": p.noise_multiplier, "noise_at": p.noise_at, "delta": p.delta,
           "sampling": cfg.schedule.sampling, "rounds": cfg.schedule.rounds}
    if accountant is not None:
        out.update(epsilon=accountant.epsilon(cfg.schedule.rounds), accountant=p.accountant, neighbouring=accountant.relation,
                   target_epsilon=p.target_epsilon,
                   stopped_by_target=cfg.schedule.rounds < yaml.safe_load(asked)["schedule"]["rounds"])
    return out
