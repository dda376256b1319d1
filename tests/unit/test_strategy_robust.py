"""Robust rules over every child's update, each against a straightforward numpy reference written here."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from hierfed.strategy import Krum, Median, MultiKrum, NormClip, TrimmedMean, robust, weighted_mean

# ---- references: the textbook definitions, nothing shared with hierfed.strategy.robust ----


def ref_median(x: np.ndarray) -> np.ndarray:
    return np.median(x.astype(np.float64), axis=0)


def ref_trimmed(x: np.ndarray, beta: float) -> np.ndarray:
    n = x.shape[0]
    k = math.floor(beta * n)
    return np.sort(x.astype(np.float64), axis=0)[k:n - k].mean(axis=0)


def ref_krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    """Brute force: every pairwise squared distance, the n - f - 2 smallest to the others summed."""
    x = x.astype(np.float64)
    n = x.shape[0]
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return np.array(scores)


def ref_multikrum(x: np.ndarray, f: int, m: int) -> tuple[np.ndarray, list[int]]:
    scores = ref_krum_scores(x, f)
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))[:m]
    return x[order].astype(np.float64).mean(axis=0), order


def ref_normclip(x: np.ndarray, w: np.ndarray, bound: float) -> np.ndarray:
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    clipped = x * np.minimum(1.0, bound / np.maximum(norms, 1e-300))[:, None]
    return (w[:, None] * clipped).sum(axis=0) / w.sum()


def with_outliers(n: int, dim: int, seed: int, dtype=np.float32) -> np.ndarray:
    """Gaussian updates, two of them outliers (one scaled ×50, one shifted), plus exact ties in some columns."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    x[min(1, n - 1)] *= 50.0
    x[-1] += 20.0
    x[:, 0] = 1.5  # every child equal in column 0
    x[: n // 2, 1] = -2.0  # half of them tied in column 1
    return x.astype(dtype)


@pytest.fixture(params=[None, 7], ids=["one-block", "7-value-blocks"])
def block(request, monkeypatch):
    """Run each test with the default working block and with tiny blocks (many column ranges)."""
    if request.param is not None:
        monkeypatch.setattr(robust, "_BLOCK", request.param)
    return request.param


@pytest.mark.parametrize("n", [1, 2, 5, 6, 9])  # odd and even
def test_median_equals_numpy(n: int, block) -> None:
    x = with_outliers(n, 53, seed=n)
    np.testing.assert_array_equal(robust.coordinate_median(x, np.ones(n)), ref_median(x))


def test_median_even_n_by_hand() -> None:
    x = np.array([[1.0, 5.0], [4.0, 5.0], [2.0, -1.0], [100.0, 6.0]])
    np.testing.assert_array_equal(robust.coordinate_median(x, np.ones(4)), [3.0, 5.0])  # means of the two middle values


@pytest.mark.parametrize(("n", "beta"), [(5, 0.2), (7, 0.15), (6, 0.3), (6, 0.0), (9, 0.49), (10, 0.25), (3, 0.2)])
def test_trimmed_mean_equals_sort_and_trim(n: int, beta: float, block) -> None:
    x = with_outliers(n, 41, seed=10 + n)
    np.testing.assert_allclose(robust.trimmed_mean(x, np.ones(n), beta), ref_trimmed(x, beta), rtol=1e-13, atol=1e-13)


def test_trim_count_is_floor() -> None:
    # β·n not an integer: floor (7 × 0.15 = 1.05 -> 1, 6 × 0.3 = 1.8 -> 1, 10 × 0.25 = 2.5 -> 2, 3 × 0.2 = 0.6 -> 0)
    assert [robust.trim_count(n, b) for n, b in [(7, 0.15), (6, 0.3), (10, 0.25), (3, 0.2), (4, 0.25)]] == [1, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="0 <= beta < 0.5"):
        robust.trim_count(4, 0.5)


def test_trimmed_mean_by_hand() -> None:
    # n = 5, β = 0.2 -> k = 1: column [9, 1, 3, -7, 5] sorted [-7, 1, 3, 5, 9] -> mean(1, 3, 5) = 3
    x = np.array([[9.0], [1.0], [3.0], [-7.0], [5.0]])
    np.testing.assert_array_equal(robust.trimmed_mean(x, np.ones(5), 0.2), [3.0])


@pytest.mark.parametrize(("n", "f"), [(5, 1), (7, 2), (8, 1), (4, 0), (12, 3)])
def test_krum_scores_and_choice_equal_brute_force(n: int, f: int, block) -> None:
    x = with_outliers(n, 37, seed=20 + n)
    scores = robust.krum_scores(robust.pairwise_sq_distances(x), f)
    np.testing.assert_allclose(scores, ref_krum_scores(x, f), rtol=1e-10)
    agg, chosen = robust.krum(x, np.ones(n), f)
    ref, order = ref_multikrum(x, f, 1)
    assert chosen == order[0]
    np.testing.assert_array_equal(agg, ref)


@pytest.mark.parametrize(("n", "f", "m"), [(7, 2, 3), (8, 1, None), (5, 1, 5), (6, 0, 2)])
def test_multikrum_equals_brute_force(n: int, f: int, m: int | None, block) -> None:
    x = with_outliers(n, 29, seed=30 + n)
    agg, chosen = robust.multikrum(x, np.ones(n), f, m)
    ref, order = ref_multikrum(x, f, n - f if m is None else m)
    assert list(chosen) == order
    np.testing.assert_allclose(agg, ref, rtol=1e-13, atol=1e-13)


def test_krum_ties_go_to_the_lower_index() -> None:
    x = np.tile(np.arange(4.0), (6, 1))  # six identical updates: every score 0
    _, chosen = robust.krum(x, np.ones(6), f=1)
    assert chosen == 0
    _, order = robust.multikrum(x, np.ones(6), f=1, m=3)
    assert list(order) == [0, 1, 2]


@pytest.mark.parametrize(("n", "f"), [(4, 1), (2, 0), (6, 2), (3, 1)])
def test_krum_refuses_too_few_children(n: int, f: int) -> None:
    with pytest.raises(ValueError, match=rf"f={f} Byzantine children need n > 2f \+ 2 = {2 * f + 2} children with updates, got n={n}"):
        robust.krum(np.zeros((n, 3)), np.ones(n), f)
    assert Krum(f=f).min_children() == 2 * f + 3
    with pytest.raises(ValueError, match="n > 2f"):
        Krum(f=f).aggregate_updates(np.zeros(3), np.zeros((n, 3)), np.ones(n))


def test_multikrum_refuses_m_above_n() -> None:
    with pytest.raises(ValueError, match="m must be between 1 and the n=5"):
        robust.multikrum(np.zeros((5, 2)), np.ones(5), f=1, m=6)


def test_gram_distances_survive_a_large_common_offset() -> None:
    """Rows 1e4 + small noise in float32: centring keeps the Gram-matrix distances at the brute-force values."""
    rng = np.random.default_rng(4)
    x = (1e4 + 1e-2 * rng.standard_normal((6, 5000))).astype(np.float32)
    brute = np.array([[np.sum((x[i].astype(np.float64) - x[j]) ** 2) for j in range(6)] for i in range(6)])
    np.testing.assert_allclose(robust.pairwise_sq_distances(x), brute, rtol=1e-9)


@pytest.mark.parametrize("bound", [0.5, 3.0, 1e6])  # most clipped, some clipped, none clipped
def test_normclip_equals_clip_then_weighted_mean(bound: float) -> None:
    x = with_outliers(6, 31, seed=40, dtype=np.float64)
    w = np.array([3.0, 1.0, 7.0, 2.0, 5.0, 4.0])
    agg, scales = robust.norm_clipped_mean(x, w, bound)
    np.testing.assert_allclose(agg, ref_normclip(x, w, bound), rtol=1e-12, atol=1e-14)
    norms = np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(scales, np.minimum(1.0, bound / norms), rtol=1e-12)
    if bound == 1e6:
        np.testing.assert_allclose(agg, weighted_mean(list(x), list(w)), rtol=1e-12)


def test_normclip_by_hand() -> None:
    # [3, 4] has norm 5: clipped to 1 -> [0.6, 0.8]; [0.3, 0] is inside. Weights 1, 3: ([0.6, 0.8] + [0.9, 0]) / 4
    agg, scales = robust.norm_clipped_mean(np.array([[3.0, 4.0], [0.3, 0.0]]), [1.0, 3.0], 1.0)
    np.testing.assert_allclose(agg, [0.375, 0.2], rtol=1e-15)
    np.testing.assert_allclose(scales, [0.2, 1.0])


@pytest.mark.parametrize("rule", ["median", "trimmed", "krum", "multikrum", "normclip"])
def test_zero_weight_children_take_no_part(rule: str) -> None:
    x = with_outliers(8, 19, seed=50, dtype=np.float64)
    w = np.array([1.0, 2.0, 0.0, 1.0, 3.0, 0.0, 1.0, 2.0])
    spoiled = x.copy()
    spoiled[w == 0] = 1e9  # what a weight-0 child sends does not matter
    run = {"median": lambda a, ww: robust.coordinate_median(a, ww),
           "trimmed": lambda a, ww: robust.trimmed_mean(a, ww, 0.2),
           "krum": lambda a, ww: robust.krum(a, ww, 1)[0],
           "multikrum": lambda a, ww: robust.multikrum(a, ww, 1)[0],
           "normclip": lambda a, ww: robust.norm_clipped_mean(a, ww, 2.0)[0]}[rule]
    np.testing.assert_array_equal(run(spoiled, w), run(x[w > 0], w[w > 0]))
    with pytest.raises(ValueError, match="no child has a positive weight"):
        run(x, np.zeros(8))


# ---- the Strategy classes: the gathered path and the server step ----

STRATEGIES = [Median(), TrimmedMean(beta=0.2), Krum(f=1), MultiKrum(f=1, m=3), NormClip(clip_norm=2.0), TrimmedMean(server_lr=0.5, beta=0.1)]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: f"{s.name}-{s.server_lr}")
def test_strategy_steps_params_by_server_lr_times_the_aggregate(strategy) -> None:
    rng = np.random.default_rng(60)
    x = with_outliers(7, 23, seed=61)
    w = rng.integers(1, 9, size=7).astype(float)
    params = rng.standard_normal(23)
    expected = {"median": lambda: ref_median(x), "trimmed_mean": lambda: ref_trimmed(x, strategy.beta if hasattr(strategy, "beta") else 0),
                "krum": lambda: ref_multikrum(x, 1, 1)[0], "multikrum": lambda: ref_multikrum(x, 1, 3)[0],
                "normclip": lambda: ref_normclip(x, w, 2.0)}[strategy.name]()
    assert strategy.reducible is False
    new, total = strategy.aggregate_updates(params, x, w)
    assert total == w.sum()
    np.testing.assert_allclose(new, params + strategy.server_lr * expected, rtol=1e-12, atol=1e-12)
    held = params.copy()  # the roles' path: in place, into the master copy
    again, _ = strategy.aggregate_updates(held, x, w, out=held)
    assert again is held
    np.testing.assert_array_equal(held, new)
    with pytest.raises(TypeError, match="needs every child's update"):
        strategy.aggregate(params, np.zeros(24))


def test_no_child_with_weight_leaves_params_alone() -> None:
    params, out = np.array([1.0, 2.0]), np.full(2, np.nan)
    new, total = Median().aggregate_updates(params, np.ones((3, 2)), np.zeros(3), out=out)
    assert new is out and total == 0.0
    np.testing.assert_array_equal(out, params)


def test_gathered_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match=r"updates must be \(n_children, 3\)"):
        Median().aggregate_updates(np.zeros(3), np.zeros((2, 4)), np.ones(2))
    with pytest.raises(ValueError, match="2 updates but 3 weights"):
        Median().aggregate_updates(np.zeros(3), np.zeros((2, 3)), np.ones(3))
    with pytest.raises(ValueError, match="finite and >= 0"):
        Median().aggregate_updates(np.zeros(3), np.zeros((2, 3)), [1.0, -1.0])


# ---- robustness: one bad child among honest ones (the MPI test's setting, in numpy) ----


@pytest.mark.parametrize("attack", ["scaled x100", "sign-flipped"])
def test_robust_rules_stay_near_the_honest_mean(attack: str) -> None:
    rng = np.random.default_rng(70)
    n, dim = 10, 2000
    true_mean = rng.standard_normal(dim)
    honest = true_mean + 0.02 * rng.standard_normal((n, dim))  # one honest update is ~0.02 (relative) from their mean
    x = honest.copy()
    x[3] = 100.0 * honest[3] if attack == "scaled x100" else -honest[3]
    w = np.full(n, 10.0)
    honest_mean = honest[np.arange(n) != 3].mean(axis=0)
    scale = np.linalg.norm(true_mean)
    rules = {"median": Median(), "trimmed_mean": TrimmedMean(beta=0.1), "krum": Krum(f=1), "multikrum": MultiKrum(f=1),
             "normclip": NormClip(clip_norm=1.1 * scale)}
    err = {name: np.linalg.norm(s.aggregate_updates(np.zeros(dim), x, w)[0] - honest_mean) / scale for name, s in rules.items()}
    assert 3 not in rules["krum"].chosen and 3 not in rules["multikrum"].chosen and len(rules["multikrum"].chosen) == n - 1
    mean_err = np.linalg.norm(weighted_mean(list(x), list(w)) - honest_mean) / scale
    assert mean_err > (9.0 if attack == "scaled x100" else 0.18)  # the plain mean moves by 99/10 resp. 2/10 of the true mean
    if attack == "sign-flipped":
        # a sign flip keeps the update's norm: clipping cannot tell it from an honest one (it only bounds the damage)
        assert 0.15 < err.pop("normclip") < 0.25
    for name, e in err.items():
        assert e < 0.05, (name, e, mean_err)


# ---- memory: O(dim) on top of the stacked updates ----


@pytest.mark.parametrize("rule", ["median", "trimmed", "krum", "normclip"])
def test_temporaries_stay_O_dim(rule: str) -> None:
    """n = 40 children of 100k float32 values (16 MB stacked): the rule allocates a few dims of float64, not n × dim."""
    n, dim = 40, 100_000
    x = np.random.default_rng(80).standard_normal((n, dim)).astype(np.float32)
    w = np.ones(n)
    out = np.empty(dim, dtype=np.float64)
    run = {"median": lambda: robust.coordinate_median(x, w, out=out), "trimmed": lambda: robust.trimmed_mean(x, w, 0.2, out=out),
           "krum": lambda: robust.krum(x, w, 3, out=out), "normclip": lambda: robust.norm_clipped_mean(x, w, 1.0, out=out)}[rule]
    tracemalloc.start()
    try:
        run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    budget = 2 * dim * 8 + 3 * robust._BLOCK * 8  # a float64 row or two + a few working blocks
    assert peak < budget < x.nbytes, (peak, budget, x.nbytes)
