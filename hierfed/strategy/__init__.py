"""Aggregation strategies on flat float32 vectors: pure numpy, no MPI, no models.

Every tier (edge and cloud) runs the same protocol with a Strategy:
  each child contributes `contribution(delta, weight)`; the contributions are SUM-reduced over the
  tier's communicator (associative, so hierarchies compose); the parent calls `aggregate(params,
  reduced)` to get its new parameters. Rules that must see every child's update (`reducible =
  False`: median, trimmed mean, Krum, norm clipping) take the gathered path instead: the parent
  calls `aggregate_updates(params, updates, weights)`. New algorithms are one file each, registered below.

The client side of an algorithm (FedProx's local term, SCAFFOLD's control variates, FedNova's step
counts) and the extra values it sends with the delta: hierfed.strategy.client.

LoRA-aware aggregation: the math is a set of helpers on the flat vector (hierfed.strategy.lora);
exact aggregation of the products runs at a tier as the gathered rule `lora_exact` (LoraExact), and
FFA-LoRA (A frozen) is a training option, `peft.ffa_lora` (hierfed.model.build).
"""

from __future__ import annotations

from hierfed.strategy.adaptive import FedAdagrad, FedAdam, FedYogi
from hierfed.strategy.base import Strategy, weighted_mean
from hierfed.strategy.fedavg import FedAvg, FedAvgM
from hierfed.strategy.gathered import GatheredStrategy, Krum, LoraExact, Median, MultiKrum, NormClip, TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, Median, TrimmedMean, Krum, MultiKrum, NormClip,
                LoraExact)
}


def build_strategy(cfg) -> Strategy:
    """From an AggregatorConfig (hierfed.config)."""
    cls = STRATEGIES[cfg.name]
    return cls.from_config(cfg)


__all__ = ["STRATEGIES", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedYogi", "GatheredStrategy", "Krum", "LoraExact", "Median",
           "MultiKrum", "NormClip", "Strategy", "TrimmedMean", "build_strategy", "weighted_mean"]
