"""Privacy end to end over MPI (tiny GPT-2 job): the DP wrappers with nothing to do are plain FedAvg
bit for bit; secure aggregation at the edges ends within fixed-point error of the plain run; DP noise
with secure aggregation and forced dropouts reports ε per round as the accountant computes it, stops
at privacy.target_epsilon, and fails an edge's round cleanly below t survivors; the noise at the cloud
over edges with adaptive clipping resumes exactly and moves C as the paper says."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import job_env, mpirun
from hierfed.config import load_config
from hierfed.privacy import Accountant
from hierfed.topology import load_topology
from test_jobs import _tiny_config, check_ok, final_params, rows

pytestmark = pytest.mark.mpi

SCHEDULE = {"rounds": 2, "tau1": 2, "tau2": 2}
# SGD: a change of 1e-8 in the starting point stays that small (Adam's normalised steps can turn it into ~lr)
SGD = {"lr": 0.05, "batch_size": 8, "optimizer": "sgd"}


def _round_one(out) -> np.ndarray:
    with np.load(out / "checkpoints" / "round-0001" / "state.npz") as z:
        return z["params"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain")
    cfg = _tiny_config(tmp, schedule=SCHEDULE, train=SGD)
    check_ok(mpirun(7, "run", "default", "--config", cfg, "--out", str(tmp / "run")))
    return tmp / "run"


def test_dp_wrappers_with_infinite_clip_and_no_noise_equal_plain_fedavg(plain, tmp_path):
    """privacy.clip: .inf, σ = 0: every client's update goes through the clipping wrapper and the
    tiers' strategies through NoisySum, and the adapter is plain FedAvg's, bit for bit."""
    cfg = _tiny_config(tmp_path, schedule=SCHEDULE, train=SGD, privacy={"clip": float("inf")})
    check_ok(mpirun(7, "run", "default", "--config", cfg, "--out", str(tmp_path / "wrapped")))
    np.testing.assert_array_equal(final_params(tmp_path / "wrapped"), final_params(plain))
    assert np.abs(final_params(plain)).max() > 0


def test_secagg_of_int8_codes_at_the_edges_matches_the_plain_run(plain, tmp_path):
    """Quantise, then mask: each client's w·Δ becomes int8 codes on the shared grid (bound 10: step
    10/127, stochastic rounding, error feedback on the device), the codes are masked in Z_2^32 and
    the edge unmasks their sum. Over 2 rounds the run stays within int8's error of the plain run (the
    fixed-point path is run end to end by the dropout job below and checked bit for bit in
    tests/unit/test_privacy_secagg.py); the residuals are the devices' checkpointed state, not the
    edges'; masks and keys are counted. Each edge sums 2 clients' codes in [-127, 127]: |Σq| <= 254
    fits int16, so the codes travel as 2-byte words of Z_2^16 (with the weight in limbs), and the
    device-edge uplink's ring payload is exactly 2 bytes x (D + weight words) per client update."""
    cfg = _tiny_config(tmp_path, schedule=SCHEDULE, train=SGD, privacy={"secagg": True, "secagg_bound": 10.0},
                       compression={"device_up": "int8"})
    out = tmp_path / "secagg"
    check_ok(mpirun(7, "run", "default", "--config", cfg, "--out", str(out)))
    a, b = final_params(out), final_params(plain)
    moved, off = np.abs(b - _round_one(plain)).max(), np.abs(a - b).max()  # round 2's step; int8's error after 2 rounds
    assert 0 < off < 0.1 * moved, (off, moved)  # quantised (not equal), and well within what one round moves
    edge = [r for r in rows(out) if r["tier"] == "edge"]
    assert all(r["secagg"] == {"members": 2, "survivors": 2, "t": 2, "failed": None, "saturated": 0, "ring": 16} for r in edge)
    # the protocol's time at the edge (adverts in to unmasked sum): inside the edge round; plain edges have none
    assert all(0 < r["seconds"]["secagg"] < r["seconds"]["wall"] for r in edge)
    assert all("secagg" not in r["seconds"] for r in rows(plain) if r["tier"] == "edge")
    ranks = out / "checkpoints" / "ranks" / "round-0002"
    with np.load(ranks / "rank-00003.npz") as z:  # a device of edge0: its clients' residuals, float64, bounded by a step
        res = [z[k] for k in z.files if k.startswith("residual/")]
    assert res and all(r.dtype == np.float64 and 0 < np.abs(r).max() <= 10.0 / 127 for r in res)
    with np.load(ranks / "rank-00001.npz") as z:  # an edge's own state file: no residual of its devices
        assert not [k for k in z.files if "residual" in k]
    s, p = (json.loads((d / "summary.json").read_text()) for d in (out, plain))
    # the ring payload as it travelled: all device-edge bytes up less SecAgg's keys, shares and reveals
    ring = s["bytes"]["device-edge"]["up"] - s["bytes_secagg"]["device-edge"]["up"]
    n = max(len(e.all_clients) for e in load_topology("default").placement().edges)
    assert n * 127 <= 2**15 - 1  # the rule, written out: every sum of n int8 codes lies in int16
    limb = max(b for b in range(1, 17) if n * (2**b - 1) <= 2**16 - 1)  # a weight limb's sum cannot wrap
    dim, updates = a.size, sum(r["secagg"]["survivors"] for r in edge)
    assert updates == 2 * 2 * 2 * 2  # rounds x edge rounds x edges x clients
    assert ring == 2 * (dim + -(-32 // limb)) * updates, (ring, dim, updates)
    assert ring < 0.51 * 4 * (dim + 1) * updates  # about half of the Z_2^32 words' bytes
    assert s["bytes_uncompressed"]["device-edge"]["up"] >= 4 * (dim + 1) * updates  # raw: [w·Δ, w] as float32
    assert s["bytes_secagg"]["device-edge"]["up"] > 0  # keys, shares and reveals are counted
    assert "bytes_secagg" not in p  # only SecAgg runs report them
    assert s["bytes"]["edge-cloud"]["up"] == p["bytes"]["edge-cloud"]["up"]  # the cloud link is untouched


def test_noise_with_secagg_and_dropouts_reports_epsilon_and_stops_at_the_target(tmp_path):
    """Distributed noise under SecAgg, Poisson sampling, uneven edges (3 clients and 1, τ2 = 1):
    round 1 drops client 0 after masking (2 of 3 survive, t = 2: its masks are removed from shares),
    round 2 drops clients 0 and 1 (1 of 3 < t: that edge's round fails, the other edge's does not).
    ε per round is the accountant's; the target allows 2 of 4 rounds: the run ends after round 2,
    checkpointed, and says why."""
    sets = {"privacy": {"clip": 0.5, "noise_multiplier": 1.0, "noise_at": "distributed", "secagg": True},
            "schedule": {"rounds": 4, "tau1": 2, "tau2": 1, "sampling": "poisson", "client_fraction": 0.99}}
    acc = Accountant(load_config(_tiny_config(tmp_path, **sets)), flat=False, num_clients=4)
    sets["privacy"]["target_epsilon"] = (acc.epsilon(2) + acc.epsilon(3)) / 2
    cfg = _tiny_config(tmp_path, **sets)
    out = tmp_path / "dp"
    env = {**job_env(), "HIERFED_SECAGG_DROP": "1:0,2:0,2:1"}
    check_ok(mpirun(7, "run", "uneven", "--config", cfg, "--out", str(out), env=env))
    cloud = [r for r in rows(out) if r["tier"] == "cloud" and r["round"] > 0]
    assert [r["round"] for r in cloud] == [1, 2]
    assert [r["epsilon"] for r in cloud] == pytest.approx([acc.epsilon(1), acc.epsilon(2)], rel=1e-12)
    assert cloud[0]["epsilon"] < cloud[1]["epsilon"] <= sets["privacy"]["target_epsilon"]
    campus = {r["round"]: r["secagg"] for r in rows(out) if r["tier"] == "edge" and r["edge"] == "campus"}
    sampled = campus[1]["members"]
    assert campus[1]["survivors"] == sampled - 1 and campus[1]["failed"] is None
    assert campus[2]["survivors"] == campus[2]["members"] - 2
    assert "fewer than the threshold" in campus[2]["failed"]
    assert np.all(np.isfinite(final_params(out)))
    s = json.loads((out / "summary.json").read_text())["privacy"]
    assert s["stopped_by_target"] is True and s["rounds"] == 2
    assert s["epsilon"] == pytest.approx(acc.epsilon(2), rel=1e-12)


def test_dp_at_the_cloud_over_edges_with_adaptive_clipping_killed_and_resumed_equals_the_uninterrupted_run(tmp_path):
    """DP with the noise at the cloud over two edges (the edges pass their devices' sums on: τ2 = 1,
    FedAvg), Poisson sampling, adaptive clipping: the cloud keeps C, sends it through the edges to
    the devices, and the edges pass their devices' clipped-counts up. The same run killed in round 2
    (the cloud fails after round 1's checkpoint is complete; mpiexec ends the rest) and resumed ends
    on the uninterrupted run's parameters bit for bit, with the same clip norms and ε per round: the
    noise's seed (the aggregation count), C and the accountant resume exactly. ε per round is the
    accountant's for the split noise. C starts at 1e-4, far below any client's update norm after two
    SGD steps, so every client is clipped: the cloud's count is −n/2 over the clients of both edges
    (−1 from each edge's two), and C moves as the paper says from the logged noised fraction,
    b̄ = noise/n with the count noise's seeded draw written out here. The C and the count travel as
    one float64 each way per edge and round on the edge-cloud link, counted in its bytes."""
    start, quantile, lr, count_stddev = 1e-4, 0.5, 0.5, 1.0
    sets = {"privacy": {"clip": start, "noise_multiplier": 0.8, "noise_at": "cloud",
                        "adaptive_clip": {"quantile": quantile, "lr": lr, "count_stddev": count_stddev}},
            "schedule": {"rounds": 2, "tau1": 2, "tau2": 1, "sampling": "poisson", "client_fraction": 0.99}}
    cfg = _tiny_config(tmp_path, train=SGD, **sets)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    check_ok(mpirun(7, "run", "default", "--config", cfg, "--out", str(whole)))
    proc = mpirun(7, "run", "default", "--config", cfg, "--out", str(parts), env={**job_env(), "HIERFED_INJECT_FAILURE": "cloud:2"})
    assert proc.returncode != 0 and "injected failure in round 2" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert (parts / "checkpoints" / "latest").read_text().strip() == "round-0001"
    check_ok(mpirun(7, "run", "default", "--config", cfg, "--out", str(parts), "--resume"))
    np.testing.assert_array_equal(final_params(parts), final_params(whole))
    run = load_config(cfg)
    acc = Accountant(run, flat=False, num_clients=4)
    got = {d.name: [r for r in rows(d) if r["tier"] == "cloud" and r["round"] > 0] for d in (whole, parts)}
    for cloud in got.values():
        assert [r["round"] for r in cloud] == [1, 2]
        assert [r["epsilon"] for r in cloud] == pytest.approx([acc.epsilon(1), acc.epsilon(2)], rel=1e-12)
        assert cloud[0]["clip"] == start
        for t, r in enumerate(cloud, 1):  # the cloud's rank 0 draws the count noise of its aggregation t − 1
            noise = np.random.default_rng([run.seed, 0, t - 1, 0xB17, 0xD1FF]).standard_normal(1)[0] * count_stddev
            assert r["unclipped"] == pytest.approx(noise / r["clients"], rel=1e-12, abs=1e-15)  # Σ(b − ½) = −n/2: all clipped
        assert cloud[1]["clip"] == pytest.approx(start * np.exp(-lr * (cloud[0]["unclipped"] - quantile)), rel=1e-12)
    assert [(r["clip"], r["unclipped"]) for r in got["whole"]] == [(r["clip"], r["unclipped"]) for r in got["parts"]]
    edge = [r for r in rows(whole) if r["tier"] == "edge"]
    assert len(edge) == 4 and all(r["clip"] == got["whole"][r["round"] - 1]["clip"] for r in edge)  # the cloud's C, relayed
    s = {d.name: json.loads((d / "summary.json").read_text()) for d in (whole, parts)}
    assert s["whole"]["privacy"]["epsilon"] == s["parts"]["privacy"]["epsilon"] == pytest.approx(acc.epsilon(2), rel=1e-12)
    dim = final_params(whole).size
    assert s["whole"]["bytes"]["edge-cloud"]["up"] == 2 * 2 * (4 * (dim + 1) + 8)  # rounds x edges x ([Δ, w] float32 + the count)
