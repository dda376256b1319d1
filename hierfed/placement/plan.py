"""Split placement decisions: which k each device runs (`split_layers`: an integer, `auto` or none,
each with a one-line reason), what each training edge holds per rank, and the line of factors every
price depends on. Prices come from hierfed.placement.memory; `split_plan` is what the runtime asks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from hierfed.config import RunConfig
from hierfed.errors import HierfedError
from hierfed.placement.dsconfig import use_deepspeed
from hierfed.placement.memory import (
    GB,
    EdgeEstimate,
    Estimate,
    _model,
    edge_estimate,
    estimate,
    human,
    link_bytes,
    micro_batching,
    shape,
)
from hierfed.topology import DeviceSpec, Placement


@dataclass(frozen=True)
class PlanRow:
    name: str
    rank: int
    memory_gb: float
    requested: int | str | None  # the topology's split_layers: k, "auto" or None (whole model)
    k: int | None  # chosen: blocks on the device, None = whole model
    estimate: Estimate
    up: int  # bytes per local step over the device-edge link, device -> edge
    down: int  # and edge -> device
    fits: bool
    why: str



def plan(placement: Placement, cfg: RunConfig, kind: str, num_labels: int | None) -> list[PlanRow]:
    """Per device: the chosen split point and why. Raises HierfedError when a device cannot work at all."""
    return [_row(d, placement.topology.source, cfg, kind, num_labels) for d in placement.devices]


def _row(d: DeviceSpec, src: str, cfg: RunConfig, kind: str, num_labels: int | None) -> PlanRow:
    n_blocks = len(shape(cfg, kind, num_labels).blocks)
    budget, est = d.memory_gb * GB, functools.partial(estimate, cfg, kind, num_labels)
    cap, fits = human(budget), True
    if d.split_layers is None:
        k, e = None, est(None)
        fits = e.total <= budget
        why = (f"whole model ({human(e.total)} of {cap})" if fits else
               f"whole model needs {human(e.total)} > {cap}: does not fit (warning)")
    elif d.split_layers == "auto":
        # the largest k that fits, where the whole model counts as the largest of all (no link traffic)
        tries = {None: est(None)} | {j: est(j) for j in range(n_blocks - 1, 0, -1)}
        k = next((j for j, e in tries.items() if e.total <= budget), 0)
        if k == 0:
            first = f"embeddings + 1 block need {human(tries[1].total)}" if n_blocks > 1 else \
                    f"{_model(cfg)} has 1 block: nothing to split"
            raise HierfedError(f"{src}: {d.name}: split_layers auto: not even 1 block fits in {cap} ({first})")
        e = tries[k]
        if k is None:
            why = f"whole model fits ({human(e.total)} of {cap}): no split needed"
        else:
            more, over = ("the whole model", tries[None]) if k == n_blocks - 1 else (f"{k + 1} blocks", tries[k + 1])
            why = f"k={k}: {more} would need {human(over.total)} > {cap}"
    else:
        assert isinstance(d.split_layers, int)  # neither None nor "auto": both handled above
        k = d.split_layers
        if not 1 <= k < n_blocks:
            raise HierfedError(f"{src}: {d.name}: split_layers: {k} is out of range: {_model(cfg)} has "
                               f"{n_blocks} blocks, so k must be 1..{n_blocks - 1} (or auto, or all)")
        e = est(k)
        fits = e.total <= budget
        why = (f"k={k} as configured (fits: {human(e.total)} of {cap})" if fits else
               f"k={k} as configured, does not fit: needs {human(e.total)} > {cap} (warning)")
    up, down = link_bytes(cfg, k, kind, num_labels)
    return PlanRow(d.name, d.rank, d.memory_gb, d.split_layers, k, e, up, down, fits, why)


def resolve_split(placement: Placement, cfg: RunConfig, kind: str, num_labels: int | None) -> dict[int, int | None]:
    """Device rank -> blocks it holds (None = whole model): the runtime's view of `plan`."""
    if all(d.split_layers is None for d in placement.devices):
        return {d.rank: None for d in placement.devices}  # nothing to price
    return {r.rank: r.k for r in plan(placement, cfg, kind, num_labels)}


def describe(cfg: RunConfig, kind: str, num_labels: int | None) -> str:
    """One line of the factors every estimate depends on."""
    s = shape(cfg, kind, num_labels)
    mb, n = micro_batching(cfg)
    return (f"{_model(cfg)} ({kind}), {len(s.blocks)} blocks, hidden {s.hidden}; batch {cfg.train.batch_size} "
            f"= {n} micro-batches of {mb} x {cfg.model.max_length} tokens; {cfg.peft.method} r={cfg.peft.r}; "
            f"{cfg.train.optimizer}; link {cfg.split.activation_codec} up, {cfg.split.gradient_codec} down")


def split_plan(placement: Placement, cfg: RunConfig, kind: str, num_labels: int | None) -> dict[int, int | None]:
    """Device rank -> k it runs with (None: whole model). The split devices of one edge share one k,
    the smallest any of them was given (it fits them all), so the edge holds one upper stage."""
    chosen = resolve_split(placement, cfg, kind, num_labels)
    out: dict[int, int | None] = {}
    for edge in placement.edges:
        ks = [k for d in edge.devices if (k := chosen[d.rank]) is not None]
        for d in edge.devices:
            out[d.rank] = min(ks) if chosen[d.rank] is not None else None
    for d in placement.devices:
        out.setdefault(d.rank, chosen[d.rank])
    return out


def edge_plan(placement: Placement, cfg: RunConfig, kind: str, num_labels: int | None) -> list[EdgeEstimate]:
    """Per training edge of the topology: its memory per rank (edges that only aggregate are left out)."""
    ks = split_plan(placement, cfg, kind, num_labels)  # all None (no pricing) when no device has split_layers
    n_blocks, ds = len(shape(cfg, kind, num_labels).blocks), cfg.deepspeed
    rows = []
    for e in placement.edges:
        g = len(e.ranks)
        zero = (ds.zero_stage, ds.offload_optimizer) if use_deepspeed(cfg, g) else None
        engine = "plain torch" if zero is None else f"ZeRO-{zero[0]} over {g} rank{'s' if g > 1 else ''}" + (
            ", optimizer on the CPU" if zero[1] and zero[0] >= 1 else "")
        split = e.served(ks)
        work = []
        if split:
            k = ks[split[0].rank]
            blocks = f"block {k}" if k == n_blocks - 1 else f"blocks {k}-{n_blocks - 1}"
            work.append((k, f"{blocks} + head for {len(split)} split device{'s' if len(split) > 1 else ''}"))
        if e.clients:
            work.append((None, "its own client (whole model)"))
        for k, trains in work:
            per_rank, host = edge_estimate(cfg, kind, num_labels, k, g, zero, len(split))
            single, _ = edge_estimate(cfg, kind, num_labels, k, 1, None, len(split))
            rows.append(EdgeEstimate(e.name, g, trains, engine, per_rank, host, single, e.memory_gb))
    return rows
