"""What parents and children agree on: the start-up plan, client sampling, and one aggregation round.

One aggregation round between a parent and its children, the same at every tier:
  parent --Bcast params--> children; children work; children --Reduce [w*delta, w]--> parent;
  parent: strategy step; children --gather telemetry--> parent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from hierfed.comm import Channel
from hierfed.errors import HierfedError
from hierfed.strategy import Strategy


@dataclass
class Plan:
    """Sent once, cloud -> edges -> devices, before the first round (a small control message)."""

    start_round: int  # first cloud round to run (1, or after a resumed checkpoint)
    dim: int  # length of the flat trainable vector
    fingerprint: str  # names and shapes of the trainable parameters
    base_fingerprint: str  # the frozen base weights
    edge_states: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # edge strategy state on resume


def check_plan(plan: Plan, dim: int, fingerprint: str, base_fingerprint: str, who: str) -> None:
    if (dim, fingerprint) != (plan.dim, plan.fingerprint):
        raise HierfedError(f"{who}: trainable parameters differ from the cloud's ({dim} values vs {plan.dim}); all ranks must build the same model")
    if base_fingerprint != plan.base_fingerprint:
        raise HierfedError(f"{who}: frozen base weights differ from the cloud's; all ranks must load the same base model")


def sampled_clients(num_clients: int, fraction: float, seed: int, round_: int) -> np.ndarray:
    """The clients that train in a cloud round: the same set on every rank, with no communication."""
    if fraction >= 1.0:
        return np.arange(num_clients)
    k = max(1, int(round(fraction * num_clients)))
    rng = np.random.default_rng([seed, round_, 0x5A])
    return np.sort(rng.choice(num_clients, size=k, replace=False))


def aggregation_round(
    down: Channel, params: np.ndarray, strategy: Strategy, while_children_work: Callable[[], None] | None = None
) -> tuple[np.ndarray, float, list[Any], float]:
    """Parent side of one round. Returns (new params, total weight, children's telemetry, aggregate s).

    `params` is the parent's float64 master copy; children receive it as float32.
    `while_children_work` runs after the broadcast, while the children train (the cloud's eval).
    """
    down.bcast(params.astype(np.float32))
    if while_children_work is not None:
        while_children_work()
    reduced = np.empty(strategy.payload_size(params.size), dtype=np.float32)
    down.reduce_sum(reduced)
    t = time.perf_counter()
    new, weight = strategy.aggregate(params, reduced)
    agg_s = time.perf_counter() - t
    telemetry = down.gather_obj(None)
    return new, weight, telemetry, agg_s
