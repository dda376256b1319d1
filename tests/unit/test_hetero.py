"""Heterogeneous, unreliable devices: behaviour draws (hierfed.sim.behaviour), synchronous deadline
plans and FedBuff schedules (hierfed.sim.schedule), the role glue (hierfed.roles.hetero), config
and topology validation, and the simulated clock's span. Oracles: binomial bounds, hand-computed
times and steps, and a FedAvg written here in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hierfed.config import load_config
from hierfed.errors import HierfedError
from hierfed.roles.hetero import ClientSchedule
from hierfed.sim.behaviour import availability, drops_out, is_available
from hierfed.sim.clock import Rates, round_times
from hierfed.sim.schedule import Timing, plan_fedbuff, plan_sync, staleness_weight
from hierfed.topology import Behaviour, parse_topology

# ------------------------------------------------------------------------------------ draws ---


def test_draws_are_deterministic_functions_of_seed_round_client() -> None:
    b = Behaviour(availability=0.5, dropout=0.5)
    first = [(is_available(b, 7, t, s, c), drops_out(b, 7, t, s, c)) for t in range(3) for s in range(2) for c in range(20)]
    again = [(is_available(b, 7, t, s, c), drops_out(b, 7, t, s, c)) for t in range(3) for s in range(2) for c in range(20)]
    assert first == again
    other = [(is_available(b, 8, t, s, c), drops_out(b, 8, t, s, c)) for t in range(3) for s in range(2) for c in range(20)]
    assert first != other  # the seed matters


@pytest.mark.parametrize("p", [0.2, 0.9])
def test_draws_match_their_probabilities(p: float) -> None:
    """n = 4000 draws: the count of successes lies within 5 standard deviations of n p
    (a binomial's sd is sqrt(n p (1-p)); a false failure has probability < 1e-6)."""
    n = 4000
    b = Behaviour(availability=p, dropout=p)
    avail = sum(is_available(b, 0, t, 1, c) for t in range(40) for c in range(100))
    drop = sum(drops_out(b, 0, t, 1, c) for t in range(40) for c in range(100))
    sd = math.sqrt(n * p * (1 - p))
    assert abs(avail - n * p) < 5 * sd
    assert abs(drop - n * p) < 5 * sd
    # availability and dropout are independent draws: their joint frequency is close to p^2
    both = sum(is_available(b, 0, t, 1, c) and drops_out(b, 0, t, 1, c) for t in range(40) for c in range(100))
    sd2 = math.sqrt(n * p * p * (1 - p * p))
    assert abs(both - n * p * p) < 5 * sd2


def test_certain_and_impossible_draws() -> None:
    assert all(is_available(Behaviour(), 0, t, 0, c) for t in range(5) for c in range(50))
    assert not any(is_available(Behaviour(availability=0.0), 0, t, 0, c) for t in range(5) for c in range(50))
    assert all(drops_out(Behaviour(dropout=1.0), 0, t, 0, c) for t in range(5) for c in range(50))
    assert not any(drops_out(Behaviour(), 0, t, 0, c) for t in range(5) for c in range(50))


def test_diurnal_pattern_peaks_at_its_phase_and_bottoms_half_a_period_later() -> None:
    b = Behaviour(availability=0.8, period=24, amplitude=0.75, phase=0.25)
    assert availability(b, 6) == pytest.approx(0.8)  # t / period = phase
    assert availability(b, 18) == pytest.approx(0.8 * 0.25)  # the trough: availability x (1 - amplitude)
    assert availability(b, 12) == pytest.approx(0.8 * (1 - 0.75 / 2))
    n = 2000  # the trough's frequency over many clients (5 sd bound as above)
    hits = sum(is_available(b, 1, 18, 0, c) for c in range(n))
    p = 0.2
    assert abs(hits - n * p) < 5 * math.sqrt(n * p * (1 - p))


# -------------------------------------------------------------------------- synchronous ---


def _times() -> dict[int, Timing]:
    # clients 0, 1 fast (1 s a step); 2, 3 ten times slower; transfers 0.5 s each way
    return {0: Timing(0.5, 1.0, 0.5), 1: Timing(0.5, 1.0, 0.5), 2: Timing(0.5, 10.0, 0.5), 3: Timing(0.5, 10.0, 0.5)}


def test_wait_takes_everyone_and_lasts_until_the_last_arrival() -> None:
    r = plan_sync([0, 1, 2, 3], _times(), lambda c: True, lambda c: False, tau1=4)
    assert {o.steps for o in r.outcomes.values()} == {4}
    assert r.cut is None and r.span == pytest.approx(0.5 + 40 + 0.5)


def test_drop_discards_late_clients_and_the_round_lasts_until_the_deadline() -> None:
    r = plan_sync([0, 1, 2, 3], _times(), lambda c: True, lambda c: False, tau1=4, policy="drop", deadline=20.0)
    assert [(o.status, o.steps) for o in r.outcomes.values()] == [("ok", 4), ("ok", 4), ("late", 0), ("late", 0)]
    assert r.span == 20.0
    assert r.fields()["late"] == 2 and r.fields()["sampled"] == 4


def test_partial_counts_the_steps_finished_by_the_deadline() -> None:
    r = plan_sync([0, 1, 2, 3], _times(), lambda c: True, lambda c: False, tau1=4, policy="partial", deadline=25.0)
    # a slow client: 0.5 + k x 10 + 0.5 <= 25  ->  k = 2
    assert [(o.status, o.steps) for o in r.outcomes.values()] == [("ok", 4), ("ok", 4), ("partial", 2), ("partial", 2)]
    assert r.outcomes[2].finish == pytest.approx(21.0)
    assert r.span == 25.0
    # the boundary: exactly enough time for 2 steps is 2 steps, a hair less is 1
    assert plan_sync([2], _times(), lambda c: True, lambda c: False, 4, "partial", 21.0).outcomes[2].steps == 2
    assert plan_sync([2], _times(), lambda c: True, lambda c: False, 4, "partial", 20.999).outcomes[2].steps == 1
    # not even one step: late, contributes nothing
    assert plan_sync([2], _times(), lambda c: True, lambda c: False, 4, "partial", 5.0).outcomes[2].status == "late"


def test_everyone_on_time_ends_at_the_last_arrival_not_the_deadline() -> None:
    r = plan_sync([0, 1], _times(), lambda c: True, lambda c: False, tau1=4, policy="drop", deadline=100.0)
    assert r.span == pytest.approx(5.0)


def test_unavailable_and_dropped_clients_contribute_nothing_and_dropouts_hold_the_deadline() -> None:
    r = plan_sync([0, 1, 2, 3], _times(), lambda c: c != 1, lambda c: c == 0, tau1=1, policy="drop", deadline=50.0)
    assert {c: o.status for c, o in r.outcomes.items()} == {0: "dropped", 1: "unavailable", 2: "ok", 3: "ok"}
    assert r.span == 50.0  # the edge cannot know client 0 vanished: it waits for the deadline
    f = r.fields()
    assert (f["sampled"], f["available"], f["dropped"], f["late"]) == (4, 3, 1, 0)
    # under wait, a dropout is not waited for
    w = plan_sync([0, 1, 2, 3], _times(), lambda c: c != 1, lambda c: c == 0, tau1=1)
    assert w.span == pytest.approx(11.0)


def test_quantile_deadline_waits_for_the_fastest_fraction() -> None:
    t = {c: Timing(0.0, float(c + 1), 0.0) for c in range(10)}  # client c finishes 1 step at c + 1 s
    r = plan_sync(list(range(10)), t, lambda c: True, lambda c: False, tau1=1, policy="drop", quantile=0.8)
    assert r.cut == 8.0 and r.count("ok") == 8 and r.count("late") == 2
    # with dropouts among the fastest, it waits for the quantile of those that can arrive (or all of them)
    r = plan_sync(list(range(10)), t, lambda c: True, lambda c: c < 5, tau1=1, policy="drop", quantile=0.8)
    assert r.cut == 10.0 and r.count("ok") == 5


def test_over_selection_keeps_the_first_arrivals() -> None:
    t = {c: Timing(0.0, float(c + 1), 0.0) for c in range(9)}
    r = plan_sync(list(range(9)), t, lambda c: True, lambda c: False, tau1=1, policy="drop", over_selection=0.5)
    assert r.count("ok") == 6 and r.cut == 6.0  # ceil(9 / 1.5) = 6


def test_fednova_normalises_the_partial_work_the_plan_gives() -> None:
    """schedule.normalise: fednova is the FedNova client algorithm on the steps plan_sync decides:
    the edge's mean (Σ w d_i divided by NovaTier's divisor) is τ_eff Σ p_i Δ_i / τ_i."""
    from hierfed.strategy.client import FedNova

    sizes = {0: 30.0, 1: 10.0, 2: 20.0, 3: 40.0}
    r = plan_sync([0, 1, 2, 3], _times(), lambda c: True, lambda c: c == 3, tau1=4, policy="partial", deadline=25.0)
    steps = {c: r.outcomes[c].steps for c in (0, 1, 2)}
    assert steps == {0: 4, 1: 4, 2: 2} and r.outcomes[3].steps == 0
    tau_eff = (30 * 4 + 10 * 4 + 20 * 2) / 60
    rng = np.random.default_rng(0)
    d = {c: rng.normal(size=5).astype(np.float32) for c in (0, 1, 2)}
    # FedNova's aggregate: tau_eff * sum p_i d_i / tau_i (Wang et al. 2020, eq. 5), p over the contributors
    fednova = tau_eff * sum(sizes[c] / 60 * d[c].astype(np.float64) / steps[c] for c in d)
    algo = FedNova()
    acc, extra = np.zeros(5), np.zeros(1)
    for c in d:
        sent, ex = algo.payload(c, d[c], sizes[c], steps[c])
        acc += sizes[c] * sent.astype(np.float64)
        extra += ex
    edge_mean = acc / algo.tier(5, True).divisor(sum(sizes[c] for c in d), extra)  # what the edge computes
    np.testing.assert_allclose(edge_mean, fednova, rtol=1e-6)


def test_drop_renormalises_exactly_to_the_survivors_fedavg() -> None:
    """The contributions the plan lets through, summed and divided as the edge does, are the numpy
    FedAvg of the survivors' updates."""
    rng = np.random.default_rng(1)
    deltas = {c: rng.normal(size=7).astype(np.float32) for c in range(4)}
    sizes = {0: 12.0, 1: 30.0, 2: 7.0, 3: 50.0}
    r = plan_sync([0, 1, 2, 3], _times(), lambda c: c != 3, lambda c: False, tau1=4, policy="drop", deadline=20.0)
    total = np.zeros(8, dtype=np.float64)
    for c, o in r.outcomes.items():  # what each device adds ([w delta, w]; nothing when it does not train)
        if o.steps:
            total[:-1] += sizes[c] * deltas[c].astype(np.float64)
            total[-1] += sizes[c]
    survivors = [0, 1]
    oracle = sum(sizes[c] * deltas[c].astype(np.float64) for c in survivors) / sum(sizes[c] for c in survivors)
    np.testing.assert_allclose(total[:-1] / total[-1], oracle, rtol=1e-12)


# ------------------------------------------------------------------------------- FedBuff ---


def test_fedbuff_with_k_all_and_equal_clocks_is_synchronous() -> None:
    t = {c: Timing(0.1, 1.0, 0.1) for c in range(4)}
    plan = plan_fedbuff([0, 1, 2, 3], t, lambda c, a: False, tau1=3, k=4, updates=3)
    assert [[(a.client, a.version, a.staleness) for a in step] for step in plan.steps] == [
        [(c, v, 0) for c in range(4)] for v in range(3)]
    assert plan.times == pytest.approx([3.2, 6.4, 9.6])
    assert {v: sorted(x) for v, x in plan.trains.items()} == {v: [(c, v) for c in range(4)] for v in range(3)}
    assert all(a.weight == 1.0 for step in plan.steps for a in step)


def test_fedbuff_staleness_by_hand() -> None:
    """A fast client (1 s) and a slow one (3 s), K = 1: the fast one arrives at 1, 2 (updates 1, 2),
    the slow one at 3 with the model of version 0 -> staleness 2 (and the fast one's third at 3)."""
    t = {0: Timing(0.0, 1.0, 0.0), 1: Timing(0.0, 3.0, 0.0)}
    plan = plan_fedbuff([0, 1], t, lambda c, a: False, tau1=1, k=1, updates=4, exponent=0.5)
    got = [[(a.client, a.attempt, a.version, a.staleness) for a in step] for step in plan.steps]
    assert got == [[(0, 0, 0, 0)], [(0, 1, 1, 0)], [(0, 2, 2, 0)], [(1, 0, 0, 3)]]
    assert plan.times == [1.0, 2.0, 3.0, 3.0]
    assert plan.steps[3][0].weight == pytest.approx(1 / math.sqrt(4)) == staleness_weight(3, 0.5)
    assert plan.fields(2)["span_s"] == 1.0 and plan.fields(4)["span_s"] == 0.0
    assert sorted(plan.trains[0]) == [(0, 0), (1, 0)]


def test_fedbuff_dropouts_never_arrive_and_are_not_trained() -> None:
    t = {c: Timing(0.0, 1.0, 0.0) for c in range(3)}
    plan = plan_fedbuff([0, 1, 2], t, lambda c, a: c == 1 and a == 0, tau1=1, k=2, updates=2)
    assert [sorted(a.client for a in step) for step in plan.steps] == [[0, 2], [0, 1]]
    assert (1, 0) not in plan.trains.get(0, [])
    assert plan.dropped == 1


def test_fedbuff_with_every_attempt_dropped_ends() -> None:
    t = {0: Timing(0.0, 1.0, 0.0)}
    plan = plan_fedbuff([0], t, lambda c, a: True, tau1=1, k=1, updates=2, max_events=50)
    assert plan.steps == [[], []] and plan.trains == {}


# ------------------------------------------------------------------------- glue, config ---

TOPO = {"links": {"device_edge": {"bandwidth_mbps": 8, "latency_ms": 0}},
        "device_classes": {"laptop": {"tflops": 1.0}, "phone": {"tflops": 0.1, "dropout": 0.2, "availability": 0.9}},
        "edges": [{"devices": [{"ranks": 1, "clients": 2, "class": "laptop"}, {"ranks": 1, "clients": 2, "class": "phone"}]}]}


def test_topology_carries_behaviour_from_classes_and_groups() -> None:
    p = parse_topology(TOPO, "t").placement()
    assert p.devices[0].behaviour.reliable
    assert p.devices[1].behaviour == Behaviour(0.9, 0.2)
    over = {**TOPO, "edges": [{"devices": [{"class": "phone", "dropout": 0.5, "diurnal": {"period": 24, "amplitude": 0.5}}]}]}
    b = parse_topology(over, "t").placement().devices[0].behaviour
    assert (b.availability, b.dropout, b.period, b.amplitude) == (0.9, 0.5, 24, 0.5)


@pytest.mark.parametrize("field, value", [("availability", 1.5), ("dropout", -0.1), ("availability", "x")])
def test_bad_probabilities_are_one_line_errors(field: str, value) -> None:
    bad = {**TOPO, "device_classes": {"phone": {field: value}}}
    with pytest.raises(HierfedError) as e:
        parse_topology(bad, "t.yaml")
    assert "\n" not in str(e.value) and f"device_classes.phone.{field}" in str(e.value)


@pytest.mark.parametrize("sets, words", [
    (["schedule.straggler=drop"], "needs a cut-off"),
    (["schedule.deadline=2"], "need straggler: drop or partial"),
    (["schedule.edge_mode=fedbuff", "schedule.straggler=drop", "schedule.deadline=1"], "fedbuff has no deadline"),
    (["schedule.buffer_k=2"], "buffer_k applies to edge_mode=fedbuff"),
    (["schedule.straggler=partial", "schedule.deadline=1", "sim.compute=measured"], "needs sim.compute: model"),
    (["schedule.deadline_quantile=1.5", "schedule.straggler=drop"], "deadline_quantile"),
])
def test_bad_schedules_are_one_line_errors(sets: list[str], words: str) -> None:
    with pytest.raises(HierfedError) as e:
        load_config(None, sets)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_over_selection_samples_more() -> None:
    cfg = load_config(None, ["schedule.client_fraction=0.5", "schedule.over_selection=0.5", "schedule.straggler=drop"])
    assert cfg.schedule.sampling_fraction == 0.75
    assert load_config(None, ["schedule.client_fraction=0.8", "schedule.over_selection=1", "schedule.straggler=drop"]).schedule.sampling_fraction == 1.0


def test_schedule_prices_clients_by_class_and_link() -> None:
    cfg = load_config(None, ["schedule.straggler=partial", "schedule.deadline=1", "schedule.tau1=4"])
    p = parse_topology(TOPO, "t").placement()
    flops = np.full(p.num_clients, 1e11)  # 0.1 s a step on a laptop, 1 s on a phone
    sch = ClientSchedule(cfg, p, flops, 0, dim=999_999)
    down, up = 8 * 4 * 999_999 / 8e6, 8 * 4 * 1_000_000 / 8e6
    assert sch.timing[0] == Timing(pytest.approx(down), pytest.approx(0.1), pytest.approx(up))
    assert sch.timing[3].step == pytest.approx(1.0)


def test_flat_schedule_prices_the_device_cloud_link() -> None:
    cfg = load_config(None, ["schedule.straggler=drop", "schedule.deadline=1"])
    p = parse_topology({"links": {"device_cloud": {"bandwidth_mbps": 8, "latency_ms": 100}}, "devices": [{"ranks": 2, "tflops": 1.0}]},
                       "t").placement()
    sch = ClientSchedule(cfg, p, np.full(2, 1e11), None, dim=1_000_000)
    assert sch.timing[1] == Timing(pytest.approx(0.1 + 4.0), pytest.approx(0.1), pytest.approx(0.1 + 4.000004))
    assert sch.row(1, 1, {0, 1})["late"] == 2  # 8.7 s of work against a 1 s deadline


def test_plain_schedule_is_todays_loop() -> None:
    """No behaviour, no policy: every sampled client of the rank trains tau1 steps with the seed
    (seed, round, edge round, client) and contributes at once, unscaled."""
    from hierfed.seeding import derive_seed

    cfg = load_config(None, ["seed=3"])
    p = parse_topology({"edges": [{"devices": [{"ranks": 2}]}]}, "t").placement()
    sch = ClientSchedule(cfg, p, None, 0, 10)
    jobs = sch.jobs(2, 1, [0, 1], {0, 1}, 5)
    assert [(j.client, j.steps, j.seed, j.now, j.scale) for j in jobs] == [(c, 5, derive_seed(3, 2, 1, c), True, 1.0) for c in (0, 1)]
    assert sch.row(2, 1, {0, 1}) == {} and sch.due(2, 1, [0, 1], {0, 1}, set()) == []


def test_fedbuff_jobs_with_k_all_match_synchronous_seeds() -> None:
    from hierfed.seeding import derive_seed

    cfg = load_config(None, ["schedule.edge_mode=fedbuff", "schedule.tau2=3"])
    p = parse_topology({"edges": [{"devices": [{"ranks": 2, "tflops": 1.0}]}]}, "t").placement()
    sch = ClientSchedule(cfg, p, np.full(2, 1e12), 0, 10)
    for s in (1, 2, 3):
        jobs = sch.jobs(1, s, [0, 1], {0, 1}, 5)
        assert [(j.client, j.seed, j.now, j.scale) for j in jobs] == [(c, derive_seed(0, 1, s, c), True, 1.0) for c in (0, 1)]
        assert sch.row(1, s, {0, 1})["staleness"] == [0, 0]


def test_clock_takes_the_planned_span() -> None:
    p = parse_topology({"edges": [{"devices": [{"ranks": 2}]}]}, "t").placement()
    rows = [{"round": 0, "tier": "cloud", "seconds": {}},
            {"round": 1, "edge_round": 1, "tier": "edge", "edge": "edge0", "seconds": {"aggregate": 0}, "bytes": {},
             "work": [{"client": 0, "steps": 1, "flops": 1e12, "up": 0}], "span_s": 7.5},
            {"round": 1, "edge_round": 2, "tier": "edge", "edge": "edge0", "seconds": {"aggregate": 0}, "bytes": {}, "work": [],
             "span_s": 2.0},  # everyone late under drop: the edge still waited for the deadline
            {"round": 1, "tier": "cloud", "seconds": {"aggregate": 0}, "bytes": {}}]
    t = round_times(rows, p, Rates(reference_tflops=1.0), dim=0)[1]
    assert t.seconds == pytest.approx(9.5)


# ------------------------------------------------------------------- refused before launch ---


@pytest.mark.parametrize("topo, sets, words", [
    ({"edges": [{"devices": [{"ranks": 2}]}]}, ["schedule.edge_mode=fedbuff", "schedule.buffer_k=3"],
     "schedule.buffer_k=3 is larger than edge 'edge0's 2 clients"),
    ({"devices": [{"ranks": 2}]}, ["schedule.edge_mode=fedbuff"], "a flat topology has none"),
    ({"edges": [{"devices": [{"ranks": 1, "split_layers": 1}]}]}, ["schedule.straggler=drop", "schedule.deadline=1"],
     "has split devices"),
    ({"edges": [{"train_locally": True, "devices": [{"ranks": 1}]}]}, ["schedule.straggler=drop", "schedule.deadline=1"],
     "has train_locally: true"),
])
def test_unsupported_heterogeneity_is_refused_in_one_line(topo: dict, sets: list[str], words: str) -> None:
    from hierfed.cluster.preflight import check_supported

    with pytest.raises(HierfedError) as e:
        check_supported(parse_topology(topo, "t.yaml").placement(), load_config(None, sets))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_deadline_no_client_can_meet_is_refused_before_launch() -> None:
    """Tiny GPT-2 on 4 clients at 1 GFLOP/s: a step takes tens of ms, the transfers ~1 ms; a 1 ms
    deadline fits nothing, 10 s fits everything."""
    from hierfed.cluster.preflight import check_deadline
    from hierfed.data import load_data

    topo = parse_topology({"edges": [{"devices": [{"ranks": 2, "clients": 2, "tflops": 0.001}]}]}, "t.yaml").placement()
    base = ["model.source=gpt2", "model.max_length=16", "data.train_samples=200", "data.eval_samples=16"]
    for policy in ("drop", "partial"):
        cfg = load_config(None, base + [f"schedule.straggler={policy}", "schedule.deadline=0.001"])
        with pytest.raises(HierfedError) as e:
            check_deadline(topo, cfg, load_data(cfg.data))
        assert "no client can meet it" in str(e.value) and "\n" not in str(e.value)
    cfg = load_config(None, base + ["schedule.straggler=drop", "schedule.deadline=10"])
    check_deadline(topo, cfg, load_data(cfg.data))  # no error


def test_summary_totals_what_clients_did(tmp_path) -> None:
    from hierfed.runtime.results import RunLog

    log = RunLog(tmp_path, None, progress=False)
    log.write({"round": 1, "edge_round": 1, "tier": "edge", "sampled": 6, "available": 5, "dropped": 1, "late": 2, "partial": 1})
    log.write({"round": 1, "edge_round": 2, "tier": "edge", "sampled": 6, "available": 6, "dropped": 0, "late": 1, "partial": 0})
    assert log._participation() == {"sampled": 12, "available": 11, "dropped": 1, "late": 3, "partial": 1}
    buff = RunLog(tmp_path / "b", None, progress=False)
    buff.write({"round": 1, "edge_round": 1, "tier": "edge", "arrivals": 2, "staleness": [0, 3]})
    buff.write({"round": 1, "edge_round": 2, "tier": "edge", "arrivals": 2, "staleness": [1, 0], "dropped": 1, "discarded": 4})
    assert buff._participation() == {"dropped": 1, "arrivals": 4, "discarded": 4, "staleness_mean": 1.0, "staleness_max": 3}
    assert RunLog(tmp_path / "c", None, progress=False)._participation() == {}
