"""FedAdam, FedYogi, FedAdagrad against Reddi et al. 2021, Algorithm 2, transcribed here on its own."""

from __future__ import annotations

import io

import numpy as np
import pytest

from hierfed.strategy import FedAdagrad, FedAdam, FedYogi, Strategy

RULES = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}


def algorithm2(rule: str, x0: np.ndarray, deltas: list[np.ndarray], eta: float, beta1: float, beta2: float, tau: float):
    """Reddi et al. 2021, Algorithm 2, lines 11-15 (server part), plain numpy: the list of x_t and (m, v) per round."""
    x, m, v = x0.copy(), np.zeros_like(x0), np.full_like(x0, tau**2)  # m_{-1} = 0, v_{-1} = τ²
    xs, signs = [], set()
    for d in deltas:
        m = beta1 * m + (1 - beta1) * d
        if rule == "fedadagrad":
            v = v + d**2
        elif rule == "fedyogi":
            s = np.sign(v - d**2)
            signs |= set(s.tolist())
            v = v - (1 - beta2) * d**2 * s
        else:
            v = beta2 * v + (1 - beta2) * d**2
        x = x + eta * m / (np.sqrt(v) + tau)
        xs.append((x, m, v))
    if rule == "fedyogi":
        assert signs >= {-1.0, 1.0}  # the recorded deltas exercise both branches of the sign rule
    return xs


def recorded_rounds(seed: int = 0, rounds: int = 6, dim: int = 257, children: int = 4):
    """Per round: the children's (delta, weight) pairs, scales changing from round to round (Yogi's v goes up and down)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(rounds):
        scale = [1.0, 0.01, 3.0, 0.1, 0.5, 2.0][t % 6]
        out.append([(scale * rng.standard_normal(dim), float(rng.integers(1, 40))) for _ in range(children)])
    return out


def summed(pairs) -> np.ndarray:
    acc = np.zeros(pairs[0][0].size + 1, dtype=np.float64)
    for d, w in pairs:
        acc += Strategy.contribution(d, w, out=np.empty_like(acc))
    return acc


def weighted_mean64(pairs) -> np.ndarray:
    return sum(w * d for d, w in pairs) / sum(w for _, w in pairs)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("hp", [{"eta": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}, {"eta": 0.03, "beta1": 0.5, "beta2": 0.7, "tau": 0.5}])
def test_equals_algorithm2_over_rounds(rule: str, hp: dict) -> None:
    rounds = recorded_rounds()
    x0 = np.random.default_rng(9).standard_normal(257)
    ref = algorithm2(rule, x0, [weighted_mean64(p) for p in rounds], **hp)
    s = RULES[rule](server_lr=hp["eta"], beta1=hp["beta1"], beta2=hp["beta2"], tau=hp["tau"])
    params = x0.copy()
    for pairs, (x, m, v) in zip(rounds, ref):
        new, total = s.aggregate(params, summed(pairs), out=params)  # the roles' path: in place
        assert new is params and total == sum(w for _, w in pairs)
        np.testing.assert_allclose(params, x, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(s.state_dict()["m"], m, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(s.state_dict()["v"], v, rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize("rule", RULES)
def test_state_dict_round_trip_continues_bit_for_bit(rule: str) -> None:
    """Checkpoint after round 3 (through npz, as hierfed's checkpoints), resume in a fresh strategy: same numbers."""
    rounds = recorded_rounds(seed=3)
    a = RULES[rule](server_lr=0.05, tau=1e-2)
    pa = np.random.default_rng(1).standard_normal(257)
    for pairs in rounds[:3]:
        pa, _ = a.aggregate(pa, summed(pairs))
    buf = io.BytesIO()
    np.savez(buf, params=pa, **a.state_dict())
    buf.seek(0)
    with np.load(buf) as z:
        saved = {k: z[k] for k in z.files}
    b = RULES[rule](server_lr=0.05, tau=1e-2)
    b.load_state_dict({k: v for k, v in saved.items() if k != "params"})
    pb = saved["params"]
    for pairs in rounds[3:]:
        pa, _ = a.aggregate(pa, summed(pairs))
        pb, _ = b.aggregate(pb, summed(pairs))
        np.testing.assert_array_equal(pb, pa)
        for k in ("m", "v"):
            np.testing.assert_array_equal(b.state_dict()[k], a.state_dict()[k])


def test_v_starts_at_tau_squared_by_hand() -> None:
    # FedAdagrad, β1 = 0, τ = 4, η = 1, Δ = [3, 0]: m = [3, 0]; v = τ² + Δ² = [25, 16];
    # x = [0, 0] + [3 / (5 + 4), 0 / (4 + 4)] = [1/3, 0]. (Starting from v = 0, as Flower, would give 3 / (3 + 4).)
    s = FedAdagrad(server_lr=1.0, beta1=0.0, tau=4.0)
    x = s.step(np.zeros(2), np.array([3.0, 0.0]))
    np.testing.assert_array_equal(s.v, [25.0, 16.0])
    np.testing.assert_allclose(x, [1 / 3, 0.0], rtol=1e-15)


def test_yogi_sign_rule_by_hand() -> None:
    # τ = 2 (v_{-1} = 4), β2 = 0.5, Δ = [4, 1, 2]: v - Δ² = [-12, 3, 0], sign [-1, 1, 0];
    # v = 4 - 0.5·[16, 1, 4]·[-1, 1, 0] = [12, 3.5, 4]. Adam's EMA would give 0.5·4 + 0.5·[16, 1, 4] = [10, 2.5, 4].
    yogi, adam = FedYogi(server_lr=1.0, beta2=0.5, tau=2.0), FedAdam(server_lr=1.0, beta2=0.5, tau=2.0)
    yogi.step(np.zeros(3), np.array([4.0, 1.0, 2.0]))
    adam.step(np.zeros(3), np.array([4.0, 1.0, 2.0]))
    np.testing.assert_array_equal(yogi.v, [12.0, 3.5, 4.0])
    np.testing.assert_array_equal(adam.v, [10.0, 2.5, 4.0])


def test_no_update_takes_no_step() -> None:
    s = FedAdam()
    params = np.array([1.0, 2.0])
    new, total = s.aggregate(params, np.zeros(3, dtype=np.float32))
    assert total == 0.0 and s.state_dict() == {}
    np.testing.assert_array_equal(new, params)


@pytest.mark.parametrize("rule", RULES)
def test_aggregate_updates_equals_the_sum_path(rule: str) -> None:
    """The gathered path of a reducible rule: the same step on the same weighted mean."""
    pairs = recorded_rounds(seed=5, rounds=1)[0]
    params = np.random.default_rng(2).standard_normal(257)
    a, b = RULES[rule](), RULES[rule]()
    via_sum, w1 = a.aggregate(params, summed(pairs))
    via_rows, w2 = b.aggregate_updates(params, np.stack([d for d, _ in pairs]), np.array([w for _, w in pairs]))
    assert w1 == w2
    np.testing.assert_allclose(via_rows, via_sum, rtol=1e-12)


def test_defaults_and_bad_values() -> None:
    assert (FedAdam().server_lr, FedAdam().tau, FedYogi().server_lr, FedYogi().tau) == (0.1, 1e-9, 0.01, 1e-3)
    with pytest.raises(ValueError, match="beta1"):
        FedAdam(beta1=1.0)
    with pytest.raises(ValueError, match="needs both m and v"):
        FedAdam().load_state_dict({"m": np.zeros(2)})
