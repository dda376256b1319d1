"""hierfed.strategy: aggregation math on flat vectors, checked against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from hierfed.config import AggregatorConfig
from hierfed.strategy import FedAvg, FedAvgM, Strategy, build_strategy, weighted_mean

# Three clients, weights 1, 2, 5 (total 8):
#   1*[1, 0, -2] + 2*[2, 4, 1] + 5*[0, 8, 3] = [5, 48, 15];  / 8 = [0.625, 6.0, 1.875]
DELTAS = [np.array([1.0, 0.0, -2.0]), np.array([2.0, 4.0, 1.0]), np.array([0.0, 8.0, 3.0])]
WEIGHTS = [1.0, 2.0, 5.0]
MEAN = np.array([0.625, 6.0, 1.875])
PARAMS = np.array([10.0, 20.0, 30.0])


def summed(deltas, weights, dtype=np.float32) -> np.ndarray:
    """What the parent holds after the SUM-reduce of every child's contribution."""
    acc = np.zeros(Strategy.payload_size(deltas[0].size), dtype=dtype)
    for d, w in zip(deltas, weights):
        acc += Strategy.contribution(d, w, out=np.empty_like(acc))
    return acc


def test_weighted_mean_by_hand() -> None:
    np.testing.assert_array_equal(weighted_mean(DELTAS, WEIGHTS), MEAN)


def test_weighted_mean_rejects_zero_weight() -> None:
    with pytest.raises(ValueError, match="positive total weight"):
        weighted_mean(DELTAS, [0.0, 0.0, 0.0])


def test_fedavg_aggregate_by_hand() -> None:
    new, total = FedAvg().aggregate(PARAMS, summed(DELTAS, WEIGHTS))
    assert total == 8.0
    np.testing.assert_array_equal(new, [10.625, 26.0, 31.875])
    assert new.dtype == np.float64


def test_server_lr_scales_the_mean_delta() -> None:
    new, _ = FedAvg(server_lr=0.5).aggregate(PARAMS, summed(DELTAS, WEIGHTS))
    np.testing.assert_array_equal(new, [10.3125, 23.0, 30.9375])


def test_contribution_wire_format() -> None:
    c = Strategy.contribution(np.array([1.0, 2.0, 3.0], dtype=np.float32), 2.0)
    assert c.dtype == np.float32 and c.size == Strategy.payload_size(3) == 4
    np.testing.assert_array_equal(c, [2.0, 4.0, 6.0, 2.0])
    out = np.full(4, 7.0, dtype=np.float32)
    assert Strategy.contribution(np.ones(3), 0.5, out=out) is out
    np.testing.assert_array_equal(out, [0.5, 0.5, 0.5, 0.5])


def test_accumulate_equals_summed_contributions() -> None:
    acc = np.zeros(4, dtype=np.float32)
    for d, w in zip(DELTAS, WEIGHTS):
        Strategy.accumulate(acc, d, w)
    np.testing.assert_array_equal(acc, [5.0, 48.0, 15.0, 8.0])
    np.testing.assert_array_equal(acc, summed(DELTAS, WEIGHTS))


def test_mean_delta_divides_in_float64() -> None:
    delta, total = Strategy.mean_delta(np.array([1.0, 2.0, 3.0], dtype=np.float32))
    assert delta.dtype == np.float64 and total == 3.0
    np.testing.assert_array_equal(delta, [1 / 3, 2 / 3])  # exact in float64, not float32's 1/3
    assert Strategy.mean_delta(np.zeros(3, dtype=np.float32)) == (None, 0.0)


def test_summed_contributions_aggregate_to_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=50) for _ in range(6)]
    weights = [float(w) for w in rng.integers(1, 100, size=6)]
    params = rng.normal(size=50)
    new, total = FedAvg().aggregate(params, summed(deltas, weights, np.float64))
    assert total == sum(weights)
    np.testing.assert_allclose(new, params + weighted_mean(deltas, weights), rtol=0, atol=1e-12)


def test_two_level_equals_one_level() -> None:
    """Edges of clients, each edge sending contribution(edge mean delta, edge weight) == flat FedAvg."""
    rng = np.random.default_rng(1)
    edges = [[(rng.normal(size=20), float(rng.integers(1, 50))) for _ in range(n)] for n in (1, 3, 4)]
    params = rng.normal(size=20)
    cloud_sum = np.zeros(21)
    for clients in edges:
        edge_mean, edge_weight = Strategy.mean_delta(summed(*zip(*clients), dtype=np.float64))
        assert edge_weight == sum(w for _, w in clients)
        cloud_sum += Strategy.contribution(edge_mean, edge_weight, out=np.empty(21))
    two_level, total = FedAvg().aggregate(params, cloud_sum)
    flat = [c for clients in edges for c in clients]
    one_level, flat_total = FedAvg().aggregate(params, summed(*zip(*flat), dtype=np.float64))
    assert total == flat_total
    np.testing.assert_allclose(two_level, one_level, rtol=0, atol=1e-12)


@pytest.mark.parametrize("strategy", [FedAvg(), FedAvgM()])
def test_zero_total_weight_leaves_params_unchanged(strategy: Strategy) -> None:
    new, total = strategy.aggregate(PARAMS, np.zeros(4, dtype=np.float32))
    assert total == 0.0
    np.testing.assert_array_equal(new, PARAMS)
    assert strategy.state_dict() == {}  # no step was taken


def test_fedavgm_two_steps_by_hand() -> None:
    # momentum 0.5, server_lr 2:
    #   step 1: v = [1, 2];                        p = [0, 0] + 2*[1, 2]   = [2, 4]
    #   step 2: v = 0.5*[1, 2] + [2, -2] = [2.5, -1]; p = [2, 4] + 2*[2.5, -1] = [7, 2]
    s = FedAvgM(server_lr=2.0, momentum=0.5)
    p1 = s.step(np.zeros(2), np.array([1.0, 2.0]))
    np.testing.assert_array_equal(p1, [2.0, 4.0])
    p2 = s.step(p1, np.array([2.0, -2.0]))
    np.testing.assert_array_equal(s.velocity, [2.5, -1.0])
    np.testing.assert_array_equal(p2, [7.0, 2.0])


def test_fedavgm_state_round_trip() -> None:
    a = FedAvgM(server_lr=1.0, momentum=0.9)
    a.step(np.zeros(3), np.array([1.0, -1.0, 0.5]))
    b = FedAvgM(server_lr=1.0, momentum=0.9)
    b.load_state_dict({k: v.copy() for k, v in a.state_dict().items()})
    np.testing.assert_array_equal(b.velocity, [1.0, -1.0, 0.5])
    d = np.array([0.25, 0.5, -1.0])
    np.testing.assert_array_equal(a.step(PARAMS, d), b.step(PARAMS, d))
    fresh = FedAvgM()
    fresh.load_state_dict({})
    assert fresh.velocity is None and fresh.state_dict() == {}


def test_build_strategy_from_config() -> None:
    s = build_strategy(AggregatorConfig())
    assert type(s) is FedAvg and s.server_lr == 1.0
    m = build_strategy(AggregatorConfig(name="fedavgm", server_lr=0.5, momentum=0.8))
    assert type(m) is FedAvgM and (m.server_lr, m.momentum) == (0.5, 0.8)


@pytest.mark.parametrize("make", [FedAvg, lambda: FedAvg(server_lr=0.5), FedAvgM, lambda: FedAvgM(server_lr=2.0, momentum=0.5)])
def test_aggregate_in_place_equals_the_allocating_formula(make) -> None:
    """aggregate(out=params) (what the roles do: reused buffers, no temporaries) gives exactly the
    numbers of the allocating path, round after round, momentum state and a round with no updates included."""
    rng = np.random.default_rng(7)
    dim = 1001
    ref, fast = make(), make()
    ref_params = rng.standard_normal(dim)
    params = ref_params.copy()
    for r in range(4):
        reduced = np.append(rng.standard_normal(dim).astype(np.float32) * 3, np.float32(0 if r == 2 else 7 + r))
        ref_params, ref_total = ref.aggregate(ref_params, reduced)
        new, total = fast.aggregate(params, reduced, out=params)
        assert new is params and total == ref_total
        np.testing.assert_array_equal(params, ref_params)
        assert ref.state_dict().keys() == fast.state_dict().keys()
        for k, v in ref.state_dict().items():
            np.testing.assert_array_equal(fast.state_dict()[k], v)


@pytest.mark.parametrize("make", [FedAvg, lambda: FedAvg(server_lr=0.5), FedAvgM, lambda: FedAvgM(server_lr=2.0, momentum=0.5)])
def test_blockwise_aggregate_over_many_blocks_equals_the_allocating_formula(make) -> None:
    """FedAvg and FedAvgM step block by block (`blockwise`): over several blocks and a ragged last
    one, the same bits as whole arrays, signed zeros included, momentum state too."""
    from hierfed.strategy.base import BLOCK

    rng = np.random.default_rng(5)
    dim = 2 * BLOCK + 17
    ref, fast = make(), make()
    assert fast.blockwise
    ref_params = rng.standard_normal(dim)
    ref_params[:2] = [0.0, -0.0]
    params = ref_params.copy()
    for r in range(3):
        reduced = np.append(rng.standard_normal(dim).astype(np.float32), np.float32(3 + r))
        reduced[:3] = [-0.0, 0.0, -0.0]
        ref_params, _ = ref.aggregate(ref_params, reduced)
        new, _ = fast.aggregate(params, reduced, out=params)
        assert new is params
        np.testing.assert_array_equal(params.view(np.uint64), ref_params.view(np.uint64))
        for k, v in ref.state_dict().items():
            np.testing.assert_array_equal(fast.state_dict()[k].view(np.uint64), v.view(np.uint64))


@pytest.mark.parametrize(("new_t", "base_t", "weight"),
                         [(np.float64, np.float32, 17.0), (np.float32, np.float32, 0.1), (np.float64, np.float32, np.float64(3))])
def test_accumulate_difference_equals_subtract_then_accumulate(new_t, base_t, weight) -> None:
    """An edge's update (new master - received params), formed and summed block by block, is what
    subtracting whole arrays and `accumulate` give, into a zero sum and into a non-zero one."""
    from hierfed.strategy.base import BLOCK

    rng = np.random.default_rng(9)
    dim = BLOCK + 5
    base = rng.standard_normal(dim).astype(base_t)
    new = (base + rng.standard_normal(dim) * 1e-3).astype(new_t)
    new[:2], base[:2] = 0.0, -0.0  # 0 - (-0) and the sign of zero sums
    for start in (np.zeros(dim + 1, dtype=np.float32), rng.standard_normal(dim + 1).astype(np.float32)):
        plain, fast = start.copy(), start.copy()
        Strategy.accumulate(plain, np.subtract(new, base), weight)
        Strategy.accumulate_difference(fast, new, base, weight)
        np.testing.assert_array_equal(fast.view(np.uint32), plain.view(np.uint32))


def test_aggregate_into_another_buffer_leaves_params_alone() -> None:
    params, out = PARAMS.copy(), np.full(3, np.nan)
    new, _ = FedAvg().aggregate(params, summed(DELTAS, WEIGHTS), out=out)
    assert new is out
    np.testing.assert_array_equal(out, [10.625, 26.0, 31.875])
    np.testing.assert_array_equal(params, PARAMS)
    new, total = FedAvg().aggregate(params, np.zeros(4, dtype=np.float32), out=out)  # nobody trained: a copy
    assert new is out and total == 0.0
    np.testing.assert_array_equal(out, PARAMS)


@pytest.mark.parametrize(("dtype", "weight"), [(np.float32, 3), (np.float32, 0.1), (np.float64, 0.1), (np.float32, np.float64(0.1))])
def test_accumulate_with_scratch_equals_without(dtype, weight) -> None:
    rng = np.random.default_rng(3)
    deltas = [rng.standard_normal(101).astype(dtype) for _ in range(3)]
    plain, fast = np.zeros(102, dtype=np.float32), np.zeros(102, dtype=np.float32)
    scratch = np.empty(101, dtype=Strategy.scratch_dtype(deltas[0], weight))
    for d in deltas:
        Strategy.accumulate(plain, d, weight)
        Strategy.accumulate(fast, d, weight, scratch)
    np.testing.assert_array_equal(fast, plain)


@pytest.mark.parametrize("make", [FedAvg, lambda: FedAvg(server_lr=0.5), lambda: FedAvgM(server_lr=2.0, momentum=0.5)])
def test_gathered_path_of_a_reducible_rule_equals_the_sum_path(make) -> None:
    """aggregate_updates (every child's row) = aggregate (their SUM), rounds after round; weight-0 rows take no part."""
    rng = np.random.default_rng(11)
    via_sum, via_rows = make(), make()
    p_sum = rng.standard_normal(40)
    p_rows = p_sum.copy()
    for _ in range(3):
        rows = rng.standard_normal((5, 40))
        weights = np.array([3.0, 0.0, 1.0, 6.0, 2.0])
        spoiled = rows.copy()
        spoiled[1] = 1e9  # a child of weight 0 sends whatever
        p_sum, t1 = via_sum.aggregate(p_sum, summed(list(rows), list(weights), np.float64))
        new, t2 = via_rows.aggregate_updates(p_rows, spoiled, weights, out=p_rows)
        assert new is p_rows and t1 == t2 == 12.0
        np.testing.assert_allclose(p_rows, p_sum, rtol=1e-13, atol=1e-13)
    same, total = via_rows.aggregate_updates(p_rows, rows, np.zeros(5))  # nobody trained: params as they were
    assert same is p_rows and total == 0.0
