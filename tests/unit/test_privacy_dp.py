"""DP-FedAvg pieces against independent oracles: clipping (numpy norms), the noise on the sum
(its empirical std against σC/n), the accountant (dp-accounting's own value, built here), and the
one-line refusals of impossible combinations."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from hierfed.comm.codecs import parse_codec
from hierfed.comm.links import Child
from hierfed.config import load_config
from hierfed.errors import HierfedError
from hierfed.privacy import (
    Accountant,
    NoisySum,
    PrivateChild,
    budget,
    check_privacy,
    clip_to_norm,
)
from hierfed.roles.protocol import sampled_clients
from hierfed.strategy import FedAvg, FedAvgM
from hierfed.topology import load_topology


def test_clipping_bounds_every_norm_and_keeps_direction():
    rng = np.random.default_rng(0)
    for scale in (1e-3, 0.5, 1.0, 3.0, 1e4):
        d = (rng.standard_normal(5000) * scale).astype(np.float32)
        c, norm = clip_to_norm(d, 1.0)
        assert norm == pytest.approx(np.linalg.norm(d.astype(np.float64)))
        assert np.linalg.norm(c.astype(np.float64)) <= 1.0
        if norm <= 1.0:
            assert c is d  # untouched
        else:
            assert np.linalg.norm(c.astype(np.float64)) == pytest.approx(1.0, rel=1e-6)
            cos = float(c.astype(np.float64) @ d) / (np.linalg.norm(c) * norm)
            assert cos == pytest.approx(1.0, abs=1e-6)
    big = np.full(10, 1e30, dtype=np.float32)
    assert clip_to_norm(big, math.inf)[0] is big


def test_noise_std_on_the_mean_is_sigma_c_over_n():
    """Many draws: std of (new − old) params after averaging n zero updates ≈ σC/n (tolerance 3%;
    200k samples give a relative standard error of ~0.16%); mean ≈ 0; each aggregation new noise."""
    sigma, clip, n, dim = 1.3, 0.7, 5, 20_000
    s = NoisySum(FedAvg(), sigma, clip, seed=3, who=1)
    draws = []
    for _ in range(10):
        reduced = np.zeros(dim + 1, dtype=np.float64)
        reduced[-1] = n
        params = np.zeros(dim)
        new, total = s.aggregate(params, reduced)
        assert total == n
        draws.append(new)
    x = np.concatenate(draws)
    assert np.std(x) == pytest.approx(sigma * clip / n, rel=0.03)
    assert abs(np.mean(x)) < 5 * sigma * clip / n / math.sqrt(x.size)
    assert not np.array_equal(draws[0], draws[1])
    assert s.state_dict()["dp_calls"][0] == 10


def test_sigma_zero_is_the_inner_strategy_bit_for_bit():
    rng = np.random.default_rng(1)
    params = rng.standard_normal(300)
    reduced = np.append(rng.standard_normal(300).astype(np.float32), np.float32(7))
    a, wa = NoisySum(FedAvgM(), 0.0, 1.0, 0, 0).aggregate(params.copy(), reduced.copy())
    b, wb = FedAvgM().aggregate(params.copy(), reduced.copy())
    np.testing.assert_array_equal(a, b)
    assert wa == wb


class _Capture:
    """A Channel stand-in for the uncompressed uplink: keeps what would be SUM-reduced."""

    def __init__(self):
        self.sent = []

    def reduce_sum(self, buf, senders=None):
        self.sent.append(buf.copy())


def _child(ch):
    return Child(ch, parse_codec("identity"), parse_codec("identity"), 50, error_feedback=False)


def test_private_child_with_infinite_clip_and_no_noise_sends_what_child_sends():
    rng = np.random.default_rng(2)
    deltas = [(rng.standard_normal(50) * 10).astype(np.float32) for _ in range(3)]
    plain, private = _Capture(), _Capture()
    c = _child(plain)
    p = PrivateChild(_child(private), math.inf, 0.0, uniform=False, distributed=False, seed=0, start_round=1, edge_rounds=1, agg_size=lambda t: 3)
    for i, d in enumerate(deltas):
        c.add(i, 10 + i, d)
        p.add(i, 10 + i, d)
    assert c.send() == p.send() == 33
    np.testing.assert_array_equal(plain.sent[0], private.sent[0])


def test_private_child_clips_and_weighs_uniformly_under_noise():
    rng = np.random.default_rng(3)
    ch = _Capture()
    p = PrivateChild(_child(ch), 1.0, 1.0, uniform=True, distributed=False, seed=0, start_round=1, edge_rounds=2, agg_size=lambda t: 2)
    deltas = [(rng.standard_normal(50) * 5).astype(np.float32) for _ in range(2)]
    for i, d in enumerate(deltas):
        p.add(i, 40.0, d)
    assert p.send() == 80.0  # telemetry: samples
    sent = ch.sent[0]
    assert sent[-1] == 2.0  # weight 1 per client
    want = sum(d / np.linalg.norm(d.astype(np.float64)) for d in deltas)
    np.testing.assert_allclose(sent[:-1], want, atol=1e-5)


def test_distributed_noise_sums_to_sigma_c():
    """n clients each add N(0, (σC)²/n): their noise sum has std σC (zero updates; tolerance 3%)."""
    sigma, clip, n, dim = 2.0, 0.5, 4, 40_000
    ch = _Capture()
    child = Child(ch, parse_codec("identity"), parse_codec("identity"), dim, error_feedback=False)
    p = PrivateChild(child, clip, sigma, uniform=True, distributed=True, seed=9, start_round=1, edge_rounds=1, agg_size=lambda t: n)
    for c in range(n):
        p.add(c, 1.0, np.zeros(dim, dtype=np.float32))
    p.send()
    assert np.std(ch.sent[0][:-1]) == pytest.approx(sigma * clip, rel=0.03)
    assert p.round == (2, 1)


def _cfg(**sets):
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def test_epsilon_is_dp_accountings_value_and_grows():
    """Poisson sampling, noise at the edges (τ2 = 2 edge rounds per cloud round): the library's ε for
    PoissonSampled(q, Gaussian(σ/√2)) composed T times, built here independently."""
    cfg = _cfg(**{"privacy.clip": 1.0, "privacy.noise_multiplier": 1.1, "schedule.sampling": "poisson",
                  "schedule.client_fraction": 0.1, "schedule.tau2": 2, "privacy.delta": 1e-5})
    acc = Accountant(cfg, flat=False, num_clients=100)
    eps = [acc.epsilon(t) for t in range(1, 6)]
    for t, e in enumerate(eps, 1):
        oracle = rdp.RdpAccountant()
        oracle.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1 / math.sqrt(2))), t)
        assert e == pytest.approx(oracle.get_epsilon(1e-5), rel=1e-12)
    assert all(a < b for a, b in zip(eps, eps[1:]))
    # the cloud (k = 1) spends less than the edges with τ2 = 2
    cloud = Accountant(_cfg(**{"privacy.clip": 1.0, "privacy.noise_multiplier": 1.1, "privacy.noise_at": "cloud", "schedule.sampling": "poisson",
                               "schedule.client_fraction": 0.1, "schedule.tau2": 2}), flat=False, num_clients=100)
    assert cloud.epsilon(5) < eps[-1]


def test_fixed_size_sampling_is_replace_one_and_pld_refuses_it():
    cfg = _cfg(**{"privacy.clip": 1.0, "privacy.noise_multiplier": 1.0, "schedule.client_fraction": 0.5, "schedule.tau2": 1})
    acc = Accountant(cfg, flat=True, num_clients=8)
    oracle = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    oracle.compose(dp_accounting.SampledWithoutReplacementDpEvent(8, 4, dp_accounting.GaussianDpEvent(0.5)), 3)
    assert acc.epsilon(3) == pytest.approx(oracle.get_epsilon(1e-5), rel=1e-12)
    with pytest.raises(HierfedError, match="pld cannot account fixed-size"):
        Accountant(_cfg(**{"privacy.clip": 1.0, "privacy.noise_multiplier": 1.0, "schedule.client_fraction": 0.5,
                           "privacy.accountant": "pld"}), flat=True, num_clients=8)


def test_target_epsilon_cuts_rounds_and_refuses_round_one():
    placement = load_topology("default").placement()
    base = {"privacy.clip": 1.0, "privacy.noise_multiplier": 1.0, "schedule.sampling": "poisson", "schedule.client_fraction": 0.5,
            "schedule.rounds": 20, "schedule.tau2": 1}
    cfg, acc = budget(_cfg(**base), placement)
    assert cfg.schedule.rounds == 20
    target = (acc.epsilon(6) + acc.epsilon(7)) / 2
    cut, _ = budget(_cfg(**base, **{"privacy.target_epsilon": target}), placement)
    assert cut.schedule.rounds == 6
    with pytest.raises(HierfedError, match="already exceeded at round 1"):
        budget(_cfg(**base, **{"privacy.target_epsilon": acc.epsilon(1) / 2}), placement)


def test_poisson_sampling_draws_each_client_with_probability_q():
    sizes = [len(sampled_clients(200, 0.1, 0, t, "poisson")) for t in range(1, 301)]
    assert np.mean(sizes) == pytest.approx(20, rel=0.05)
    assert len(set(sizes)) > 5  # not a fixed size
    assert len(sampled_clients(200, 0.1, 0, 1, "fixed")) == 20


@pytest.mark.parametrize("sets, topology, message", [
    ({"privacy.noise_multiplier": 1.0}, "default", "needs a finite privacy.clip"),
    ({"privacy.clip": 1.0, "privacy.noise_multiplier": 1.0, "privacy.noise_at": "edge"}, "flat", "flat topology has no edge tier"),
    ({"privacy.clip": 1.0, "privacy.noise_multiplier": 1.0, "privacy.noise_at": "cloud", "schedule.tau2": 2}, "default", "tau2: 1"),
    ({"privacy.clip": 1.0, "privacy.noise_multiplier": 1.0, "aggregation.edge.name": "median"}, "default", "must see every update"),
    ({"privacy.clip": 1.0, "privacy.noise_multiplier": 1.0, "compression.device_up": "int8"}, "default", "device_up"),
    ({"privacy.clip": 1.0}, "edge-clients", "train_locally"),
    ({"privacy.target_epsilon": 1.0}, "default", "needs privacy.noise_multiplier"),
    ({"privacy.clip": 1.0, "privacy.noise_multiplier": 1.0, "schedule.straggler": "drop", "schedule.over_selection": 0.5},
     "default", "unreliable devices"),
    ({"privacy.clip": 1.0, "privacy.noise_multiplier": 1.0}, "hetero-phones", "unreliable devices"),
])
def test_impossible_combinations_are_refused_in_one_line(sets, topology, message):
    with pytest.raises(HierfedError, match=message) as e:
        check_privacy(load_topology(topology).placement(), _cfg(**sets))
    assert "\n" not in str(e.value)
