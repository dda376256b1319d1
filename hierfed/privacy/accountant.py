"""(ε, δ) of a run's DP-FedAvg from Google's dp-accounting library (RDP or PLD), not a home-made formula.

With adaptive clipping each aggregation also releases the noised clipped-count; the pair is one
Gaussian mechanism of multiplier (σ_Δ^-2 + (2σ_b)^-2)^(-1/2) (`effective_multiplier`).

One cloud round is one event: a sampled client's update enters k noised sums (k = τ2 when the edges
add the noise, 1 at the cloud), each with noise multiplier σ, which compose to a single Gaussian
mechanism with multiplier σ/√k; the round's sampling amplifies it:
  schedule.sampling poisson   PoissonSampledDpEvent(q, Gaussian(σ/√k))             add/remove one client
  fixed, client_fraction < 1  SampledWithoutReplacementDpEvent(N, m, Gaussian(σ/(2√k)))   replace one client
                              (replacing a client moves a clipped sum by up to 2C; RDP accountant only)
  client_fraction = 1         Gaussian(σ/√k)                                       add/remove one client
T rounds are that event self-composed T times. Edges hold disjoint clients (parallel composition), so
noise at the edges costs what noise at the cloud costs for the same k.

dp-accounting (and the scipy it pulls in) is imported by the functions that use it: every rank of
every job imports this package, and the import costs seconds of CPU per rank; only runs with DP
noise need it.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from hierfed.errors import HierfedError

if TYPE_CHECKING:
    import dp_accounting


def effective_multiplier(p) -> float:
    """The noise multiplier of one aggregation's release. Without adaptive clipping σ. With it, the
    update sum (multiplier σ_Δ, sensitivity C) and the clipped-count Σ(b − ½) (std σ_b, sensitivity
    ½: multiplier 2σ_b) are released together, a Gaussian mechanism on a 2-part query whose
    multiplier is (σ_Δ^-2 + (2σ_b)^-2)^(-1/2) (Andrew et al. 2021, Thm. 1) — computed here from the
    split, not taken from σ, so the count's noise is what is accounted."""
    a = p.adaptive_clip
    if a is None:
        return p.noise_multiplier
    return (p.value_noise_multiplier**-2 + (2 * a.count_stddev) ** -2) ** -0.5


def round_event(sigma: float, k: int, sampling: str, fraction: float, num_clients: int) -> tuple[dp_accounting.DpEvent, str]:
    """(one cloud round's DpEvent, its neighbouring relation: "add_remove" or "replace_one")."""
    import dp_accounting

    z = sigma / math.sqrt(k)
    if fraction >= 1.0:
        return dp_accounting.GaussianDpEvent(z), "add_remove"
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(fraction, dp_accounting.GaussianDpEvent(z)), "add_remove"
    m = max(1, int(round(fraction * num_clients)))  # as hierfed.roles.protocol.sampled_clients draws them
    return dp_accounting.SampledWithoutReplacementDpEvent(num_clients, m, dp_accounting.GaussianDpEvent(z / 2)), "replace_one"


def _accountant(kind: str, relation: str):
    import dp_accounting
    from dp_accounting import pld, rdp

    rel = dp_accounting.NeighboringRelation.REPLACE_ONE if relation == "replace_one" else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    if kind == "pld":
        if relation == "replace_one":
            raise HierfedError("privacy.accountant pld cannot account fixed-size client sampling; use schedule.sampling: poisson or accountant: rdp")
        return pld.PLDAccountant(rel)
    return rdp.RdpAccountant(neighboring_relation=rel)


class Accountant:
    """ε after each cloud round of a run (from its config and topology)."""

    def __init__(self, cfg, flat: bool, num_clients: int) -> None:
        from hierfed.privacy.setup import aggregations_per_round

        p, s = cfg.privacy, cfg.schedule
        self.delta, self.kind = p.delta, p.accountant
        self.event, self.relation = round_event(effective_multiplier(p), aggregations_per_round(cfg, flat), s.sampling, s.client_fraction, num_clients)
        _accountant(self.kind, self.relation)  # refuse an impossible combination now

    def epsilon(self, rounds: int) -> float:
        """ε at δ after `rounds` cloud rounds (0 rounds: 0)."""
        if rounds <= 0:
            return 0.0
        # The RDP accountant logs (absl) every order it drops for not converging, at small σ a few
        # dozen lines a round; the orders it keeps still bound ε, so keep the run's output readable.
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            acc = _accountant(self.kind, self.relation)
            acc.compose(self.event, rounds)
            return float(acc.get_epsilon(self.delta))
        finally:
            absl.setLevel(level)

    def rounds_within(self, target: float, rounds: int) -> int:
        """The most rounds (<= `rounds`) whose ε stays at or below `target` (ε grows with rounds: bisection)."""
        lo, hi = 0, rounds
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.epsilon(mid) <= target:
                lo = mid
            else:
                hi = mid - 1
        return lo


def budget(cfg, placement):
    """The run config with schedule.rounds cut to the rounds privacy.target_epsilon allows; refuses a
    target already exceeded at round 1. Returns (cfg, the Accountant or None without noise)."""
    p = cfg.privacy
    if not p.noisy:
        return cfg, None
    acc = Accountant(cfg, placement.flat, placement.num_clients)
    if p.target_epsilon is None:
        return cfg, acc
    allowed = acc.rounds_within(p.target_epsilon, cfg.schedule.rounds)
    if allowed == 0:
        raise HierfedError(f"privacy.target_epsilon {p.target_epsilon:g} is already exceeded at round 1 "
                           f"(ε = {acc.epsilon(1):.3g} at δ = {p.delta:g}); raise noise_multiplier or lower client_fraction")
    if allowed < cfg.schedule.rounds:
        cfg = cfg.model_copy(update={"schedule": cfg.schedule.model_copy(update={"rounds": allowed})})
    return cfg, acc
