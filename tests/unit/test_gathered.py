"""The gathered path's pure parts: what pre-flight refuses, the parent's round over every update (with
its own client as one more row), exact LoRA aggregation as a tier's rule, and the attack hook."""

from __future__ import annotations

import numpy as np
import pytest

from hierfed.cluster.preflight import check_supported
from hierfed.config import load_config
from hierfed.errors import HierfedError
from hierfed.strategy import FedAvg, LoraExact, Median
from hierfed.topology import load_topology


def _check(topology: str, *sets: str) -> None:
    check_supported(load_topology(topology).placement(), load_config(None, list(sets)))


@pytest.mark.parametrize("topology, sets, message", [
    # default: 2 edges of 2 clients; Krum with f = 0 needs n > 2 updates
    ("default", ["aggregation.edge.name=krum"], "aggregation.edge.name=krum (krum_f=0) needs at least 3 updates a round, "
                                                 "but edge 'edge0' has only 2 clients below it"),
    ("default", ["aggregation.cloud.name=multikrum"], "needs at least 3 updates a round, but the cloud has only 2 edges below it"),
    ("flat-8", ["aggregation.cloud.name=krum", "aggregation.cloud.krum_f=3"], "needs at least 9 updates a round, but the cloud has only 8 clients"),
    # 8 clients, 3 a round (fraction 0.4): Krum f = 1 needs 5 in every round that has any
    ("fanout-1x8", ["aggregation.edge.name=krum", "aggregation.edge.krum_f=1", "schedule.client_fraction=0.4"],
     "in round 1 edge 'edge0' gets 3 (schedule.client_fraction=0.4 samples too few of its clients)"),
    ("split-mixed", ["aggregation.edge.name=median"], "has split devices, whose upper blocks it trains once for all of them"),
    ("default", ["aggregation.cloud.name=lora_exact", "peft.ffa_lora=true"], "with ffa_lora, A is frozen"),
    ("default", ["aggregation.edge.name=lora_exact", "peft.method=ia3"], "but peft.method is ia3"),
    # privacy (hierfed.privacy.setup): noise on a sum, secure aggregation's sums
    ("default", ["aggregation.edge.name=median", "privacy.secagg=true", "privacy.secagg_bound=10"], "aggregation.edge.name=median must see every update"),
    ("default", ["aggregation.edge.name=median", "privacy.clip=1.0", "privacy.noise_multiplier=1.0"], "must see every update"),
])
def test_what_a_gathered_rule_cannot_do_is_refused_in_one_line(topology, sets, message):
    with pytest.raises(HierfedError) as e:
        _check(topology, *sets)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sampling_that_always_leaves_enough_updates_passes():
    _check("fanout-1x8", "aggregation.edge.name=krum", "aggregation.edge.krum_f=1")  # all 8 clients every round
    _check("fanout-1x8", "aggregation.edge.name=krum", "aggregation.edge.krum_f=1", "schedule.client_fraction=0.75")  # 6 a round
    _check("default", "aggregation.edge.name=median", "privacy.clip=1.0")  # clipping without noise: each update still its own


class _Link:
    """A parent link stand-in: the children's rows, as Parent.receive_updates returns them."""

    gathered, decode_s = True, 0.0

    def __init__(self, updates, weights) -> None:
        self.updates, self.weights = np.asarray(updates, dtype=np.float32), np.asarray(weights, dtype=np.float64)

    def receive_updates(self):
        return self.updates, self.weights


def test_the_parents_own_client_is_one_more_row():
    """An edge that trains its own client writes [w·Δ, w] (add_own); the gathered round turns it into
    the row Δ of weight w: the median of 3 children and the edge's client."""
    from hierfed.roles.protocol import gathered_round

    rows = [[0.0, 10.0], [1.0, -10.0], [2.0, 0.0]]
    params = np.array([1.0, 1.0])

    def add_own(buf):
        buf[:-1] += 5 * np.array([3.0, 1.0])
        buf[-1] += 5

    new, weight, _ = gathered_round(_Link(rows, [1, 1, 1]), params, Median(), add_own)
    np.testing.assert_array_equal(new, [1 + np.median([0, 1, 2, 3]), 1 + np.median([10, -10, 0, 1])])
    assert new is params and weight == 8
    with pytest.raises(RuntimeError, match="the link sums them"):
        link = _Link(rows, [1, 1, 1])
        link.gathered = False
        gathered_round(link, params, Median(), None)


def _lora_layout(rank: int = 2, out: int = 5, inp: int = 4):
    return [("m.lora_A.default.weight", (rank, inp)), ("m.lora_B.default.weight", (out, rank)), ("head.weight", (3,))]


def test_lora_exact_rule_equals_the_svd_of_the_averaged_product():
    """Independent oracle: ΔW = Σ w_i B_i A_i / Σ w_i formed densely in numpy, its best rank-r
    approximation from a full SVD; the rule's new factors multiply to it, its residual is the
    dropped energy, the head is the weighted mean, and naive factor averaging differs."""
    rng = np.random.default_rng(0)
    manifest, r = _lora_layout(), 2
    params = rng.normal(size=8 + 10 + 3)
    updates = rng.normal(size=(3, params.size)).astype(np.float32)
    weights = np.array([1.0, 2.0, 3.0])
    rule = LoraExact()
    rule.set_layout(manifest)
    new, total = rule.aggregate_updates(params, updates, weights)
    assert total == 6
    full = params + updates.astype(np.float64)  # each child's factors
    dw = sum(w * f[8:18].reshape(5, 2) @ f[:8].reshape(2, 4) for w, f in zip(weights, full)) / 6
    u, s, vt = np.linalg.svd(dw)
    best = (u[:, :r] * s[:r]) @ vt[:r]
    np.testing.assert_allclose(new[8:18].reshape(5, 2) @ new[:8].reshape(2, 4), best, atol=1e-10)
    np.testing.assert_allclose(new[18:], (weights @ full[:, 18:]) / 6, atol=1e-12)
    report = rule.report()["aggregation"]
    assert report["rule"] == "lora_exact" and report["updates"] == 3
    assert report["residual_energy"] == pytest.approx((s[r:] ** 2).sum() / (s**2).sum(), rel=1e-9)
    mean = (weights @ full) / 6
    naive = mean[8:18].reshape(5, 2) @ mean[:8].reshape(2, 4)
    assert np.abs(naive - best).max() > 0.1


def test_lora_exact_is_exact_when_the_rank_allows_and_honours_server_lr():
    """Two children sharing A (rank r each, one A): ΔW has rank <= r, so nothing is dropped; with
    server_lr η the step is params + η (exact - params)."""
    rng = np.random.default_rng(1)
    manifest = _lora_layout()
    params = rng.normal(size=21)
    updates = np.zeros((2, 21), dtype=np.float32)
    updates[:, 8:] = rng.normal(size=(2, 13))  # B and the head change, A does not
    rule = LoraExact()
    rule.set_layout(manifest)
    new, _ = rule.aggregate_updates(params, updates, [1.0, 1.0])
    full = params + updates.astype(np.float64)
    want = sum(f[8:18].reshape(5, 2) @ f[:8].reshape(2, 4) for f in full) / 2
    np.testing.assert_allclose(new[8:18].reshape(5, 2) @ new[:8].reshape(2, 4), want, atol=1e-10)
    assert rule.report()["aggregation"]["residual_energy"] < 1e-20
    half = LoraExact(server_lr=0.5)
    half.set_layout(manifest)
    out = params.copy()
    stepped, _ = half.aggregate_updates(params.copy(), updates, [1.0, 1.0], out=out)
    np.testing.assert_allclose(stepped, params + 0.5 * (new - params), atol=1e-12)
    assert stepped is out


def test_lora_exact_needs_a_layout_with_lora_factors():
    with pytest.raises(ValueError, match="no LoRA factors"):
        LoraExact().set_layout([("head.weight", (3,))])
    with pytest.raises(RuntimeError, match="set_layout"):
        LoraExact().aggregate_updates(np.zeros(3), np.zeros((1, 3), dtype=np.float32), [1.0])


def test_ffa_lora_shared_a_makes_plain_averaging_exact():
    """FFA-LoRA's claim, on the rule's own math: with every child's A the same, FedAvg's mean of B
    times A is the mean of the products, i.e. exactly what lora_exact computes."""
    rng = np.random.default_rng(2)
    manifest = _lora_layout()
    params = rng.normal(size=21)
    updates = np.zeros((3, 21), dtype=np.float32)
    updates[:, 8:18] = rng.normal(size=(3, 10))  # only B trains
    weights = [1.0, 2.0, 5.0]
    fedavg, _ = FedAvg().aggregate_updates(params, updates, weights)
    rule = LoraExact()
    rule.set_layout(manifest)
    exact, _ = rule.aggregate_updates(params, updates, weights)
    prod = lambda v: v[8:18].reshape(5, 2) @ v[:8].reshape(2, 4)  # noqa: E731
    np.testing.assert_allclose(prod(fedavg), prod(exact), atol=1e-10)


def test_attack_hook():
    from hierfed.roles.attack import attack_hook, parse_attack

    assert parse_attack(None) is None and parse_attack("") is None
    assert parse_attack("scale:100:3,5") == (100.0, {3, 5})
    assert parse_attack("signflip:0") == (-1.0, {0})
    hook = attack_hook("scale:100:3")
    d = np.array([1.0, -2.0], dtype=np.float32)
    np.testing.assert_array_equal(hook(3, d), [100.0, -200.0])
    assert hook(3, d).dtype == np.float32 and hook(4, d) is d
    for bad in ("scale:x:1", "flip:1", "scale:2", "signflip:a"):
        with pytest.raises(HierfedError, match="HIERFED_INJECT_ATTACK"):
            parse_attack(bad)
