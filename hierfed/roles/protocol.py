"""What parents and children agree on: the start-up plan, client sampling, the codecs of each link,
and one aggregation round.

One aggregation round between a parent and its children, the same at every tier:
  parent --params--> children; children work; children --[w*delta, w]--> parent (summed);
  parent: strategy step; children --telemetry--> parent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hierfed.comm.channel import Channel, at_parent
from hierfed.comm.codecs import parse_codec
from hierfed.comm.links import Child, Parent
from hierfed.errors import HierfedError
from hierfed.strategy import Strategy
from hierfed.strategy.client import Tier


@dataclass
class Plan:
    """Sent once, cloud -> edges -> devices, before the first round (a small control message)."""

    start_round: int  # first cloud round to run (1, or after a resumed checkpoint)
    dim: int  # length of the flat trainable vector
    fingerprint: str  # names and shapes of the trainable parameters
    base_hashes: dict[str, str]  # a hash of every frozen base weight, by name
    out: str  # the run directory (ranks with state to checkpoint write there)
    step_flops: np.ndarray | None = None  # FLOPs of one local step per client, when the model clock decides (roles/hetero.py)
    manifest: list[tuple[str, tuple[int, ...]]] | None = None  # the trainable vector's names and shapes (a rule that needs them: lora_exact)


def check_plan(plan: Plan, dim: int, fingerprint: str, base_hashes: dict[str, str], who: str, part: bool = False) -> None:
    """This rank's model against the cloud's: the same trainable layout, and every frozen weight it
    holds equal to the cloud's. `part`: it holds only a part of the model (a split device); else it
    must hold every frozen weight the cloud has."""
    if (dim, fingerprint) != (plan.dim, plan.fingerprint):
        raise HierfedError(f"{who}: trainable parameters differ from the cloud's ({dim} values vs {plan.dim}); all ranks must build the same model")
    missing = None if part else next((n for n in plan.base_hashes if n not in base_hashes), None)
    if missing is not None:
        raise HierfedError(f"{who}: frozen base weight {missing} of the cloud's model is missing here; all ranks must load the same base model")
    differ = next((n for n, h in base_hashes.items() if plan.base_hashes.get(n) != h), None)
    if differ is not None:
        what = "differs from" if differ in plan.base_hashes else "is not in"
        raise HierfedError(f"{who}: frozen base weight {differ} {what} the cloud's model; all ranks must load the same base model")


def bind_layout(strategy: Strategy, manifest: list[tuple[str, tuple[int, ...]]] | None) -> None:
    """Give a tier's rule the layout of the flat vector if it needs one (`set_layout`: lora_exact)."""
    if hasattr(strategy, "set_layout"):
        strategy.set_layout(manifest)


def sampled_clients(num_clients: int, fraction: float, seed: int, round_: int, sampling: str = "fixed") -> np.ndarray:
    """The clients that train in a cloud round: the same set on every rank, with no communication.

    "fixed": round(fraction · N) clients (at least 1) without replacement; "poisson": each client
    independently with probability `fraction` (possibly none), as DP accountants assume."""
    if fraction >= 1.0:
        return np.arange(num_clients)
    rng = np.random.default_rng([seed, round_, 0x5A])
    if sampling == "poisson":
        return np.flatnonzero(rng.random(num_clients) < fraction)
    k = max(1, int(round(fraction * num_clients)))
    return np.sort(rng.choice(num_clients, size=k, replace=False))


def round_clients(cfg, num_clients: int, round_: int) -> set[int]:
    """The clients sampled for cloud round `round_` under cfg.schedule: client_fraction (raised by
    over_selection), drawn fixed-size or Poisson (schedule.sampling)."""
    s = cfg.schedule
    return set(sampled_clients(num_clients, s.sampling_fraction, cfg.seed, round_, s.sampling).tolist())


def local_steps(cfg, flat: bool) -> int:
    """Local steps of a client per edge round: tau1; in a flat topology with
    schedule.flat_local_steps "tau1*tau2", the local work of a hierarchical cloud round."""
    if flat and cfg.schedule.flat_local_steps == "tau1*tau2":
        return cfg.schedule.tau1 * cfg.schedule.tau2
    return cfg.schedule.tau1


def codec_rng(seed: int, *parts: int) -> np.random.Generator:
    """Randomness for a stochastic codec, from (seed, round, edge round, sender, link)."""
    return np.random.default_rng([seed, *parts, 0xC0DEC])


def _codecs(cfg, flat: bool, tier: str) -> tuple[str, str]:
    """(downlink, uplink) codec specs of a tier: "edge" (edge <-> devices) or "cloud" (cloud <-> children)."""
    c = cfg.compression
    if tier == "edge":
        return c.edge_down, c.device_up
    return c.cloud_down, (c.device_up if flat else c.edge_up)


def gathered(cfg, tier: str) -> bool:
    """Whether the parent of a tier ("edge" or "cloud") must see every child's update: its rule is not
    reducible (hierfed.strategy.gathered), so the uplink carries each sender's update on its own."""
    from hierfed.strategy import STRATEGIES

    return not STRATEGIES[getattr(cfg.aggregation, tier).name].reducible


def parent_link(channel: Channel, cfg, flat: bool, tier: str, dim: int, extra: int = 0) -> Parent:
    """`extra`: a client algorithm's extra values per contribution on this link (ClientAlgorithm.up_size)."""
    down, up = _codecs(cfg, flat, tier)
    return Parent(channel, parse_codec(down), parse_codec(up), dim, extra, gathered(cfg, tier))


def child_link(channel: Channel, cfg, flat: bool, tier: str, dim: int, resumed: bool, extra: int = 0) -> Child:
    down, up = _codecs(cfg, flat, tier)
    return Child(channel, parse_codec(down), parse_codec(up), dim, cfg.compression.error_feedback, resumed, extra, gathered(cfg, tier))


def prefixed(prefix: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}/{k}": v for k, v in state.items()}


def unprefixed(prefix: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + "/")}


def aggregation_round(
    link: Parent,
    params: np.ndarray,
    strategy: Strategy,
    receivers: int | None = None,
    rng: np.random.Generator | None = None,
    while_children_work: Callable[[], None] | None = None,
    add_own: Callable[[np.ndarray], None] | None = None,
    tier: Tier | None = None,
    send_down: bool = True,
    sent: np.ndarray | None = None,
) -> tuple[np.ndarray, float, list[Any], float]:
    """Parent side of one round. Returns (new params, total weight, children's telemetry, aggregate s).

    `params` is the parent's float64 master copy; children receive it as float32 (or its encoded
    change). It is updated in place (the returned new params are `params` itself), so a round
    allocates no model-sized array. `receivers` is how many logical receivers the broadcast stands
    for (ledger).
    `while_children_work` runs after the broadcast, while the children train (the cloud's eval, an
    edge serving its split devices); `add_own` adds the parent's own contribution to the sum (an
    edge's upper adapter trained for its split devices).
    `tier`: the parent's side of the run's client algorithm (hierfed.strategy.client): its `down()`
    is broadcast before the parameters when `send_down` (once per cloud round), the contributions
    carry its `extra` values after [w*delta, w], Σ w*delta is divided by its `divisor` and the
    summed extras go to its `absorb`. None, or a tier without extras: FedAvg's path, unchanged.
    `sent`: float32 values equal to `params` to broadcast instead (an edge's first round: the vector
    it received). `params` is then read only after `while_children_work`, which may fill it (the
    edge makes its master copy there, off the critical path).

    A rule that is not reducible (`strategy.reducible` False: median, Krum, ...) gets every child's
    update instead of the sum (`link.receive_updates`, the gathered path); the parent's own
    contribution, if any, becomes one more row (`gathered_round`).
    """
    down = tier.down() if tier is not None and send_down else None
    if down is not None:
        link.channel.bcast(down, receivers)
    link.send(params if sent is None else sent, receivers, rng)
    if while_children_work is not None:
        while_children_work()
    if not strategy.reducible:
        new, weight, agg_s = gathered_round(link, params, strategy, add_own)
        return new, weight, at_parent(link.channel.gather_obj(None)), agg_s
    reduced = link.receive()
    t = time.perf_counter()
    if add_own is not None:
        add_own(reduced)
    if tier is None or not tier.extra:
        new, weight = strategy.aggregate(params, reduced, out=params)
    else:  # [Σ w*delta, Σ w | extras]: the strategy sees the first part, its weight slot holding the divisor
        dim = reduced.size - 1 - tier.extra
        extras, reduced = reduced[dim + 1 :], reduced[: dim + 1]
        weight = float(reduced[dim])
        if weight > 0:
            reduced[dim] = tier.divisor(weight, extras)
        new, _ = strategy.aggregate(params, reduced, out=params)
        tier.absorb(extras, weight)
    agg_s = time.perf_counter() - t + link.decode_s
    telemetry = at_parent(link.channel.gather_obj(None))
    return new, weight, telemetry, agg_s


def gathered_round(link: Parent, params: np.ndarray, strategy: Strategy,
                   add_own: Callable[[np.ndarray], None] | None) -> tuple[np.ndarray, float, float]:
    """The parent's half of a gathered round: every child's updates, plus its own (an edge's own
    client: `add_own` writes its [w*delta, w] into a zeroed float64 buffer, which becomes a row
    delta = sum / w), then `strategy.aggregate_updates` in place. Returns (params, weight, aggregate s)."""
    if not link.gathered:
        raise RuntimeError(f"{strategy.name} needs every child's update but the link sums them (a wiring error)")
    updates, weights = link.receive_updates()
    t = time.perf_counter()
    if add_own is not None:
        own = np.zeros(params.size + 1, dtype=np.float64)
        add_own(own)
        if own[-1] > 0:
            updates = np.concatenate([updates, (own[:-1] / own[-1]).astype(np.float32)[None]])
            weights = np.append(weights, own[-1])
    new, weight = strategy.aggregate_updates(params, updates, weights, out=params)
    return new, weight, time.perf_counter() - t + link.decode_s
