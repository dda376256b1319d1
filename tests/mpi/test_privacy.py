"""Privacy end to end over MPI (tiny GPT-2 job): the DP wrappers with nothing to do are plain FedAvg
bit for bit; secure aggregation at the edges ends within fixed-point error of the plain run; DP noise
with secure aggregation and forced dropouts reports ε per round as the accountant computes it, stops
at privacy.target_epsilon, and fails an edge's round cleanly below t survivors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import job_env, mpirun
from hierfed.config import load_config
from hierfed.privacy import Accountant
from test_jobs import _tiny_config, check_ok, final_params, rows

pytestmark = pytest.mark.mpi

SCHEDULE = {"rounds": 2, "tau1": 2, "tau2": 2}
# SGD: a change of 1e-8 in the starting point stays that small (Adam's normalised steps can turn it into ~lr)
SGD = {"lr": 0.05, "batch_size": 8, "optimizer": "sgd"}


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


def test_secagg_at_the_edges_matches_the_plain_run(plain, tmp_path):
    """Masked fixed-point sums (bound 10 on |w·Δ_i|, 2 clients an edge: resolution 2·10/2^31 per
    summed coordinate, /200 samples) end within 1e-6 of the plain run; masks and keys are counted."""
    cfg = _tiny_config(tmp_path, schedule=SCHEDULE, train=SGD, privacy={"secagg": True, "secagg_bound": 10.0})
    out = tmp_path / "secagg"
    check_ok(mpirun(7, "run", "default", "--config", cfg, "--out", str(out)))
    a, b = final_params(out), final_params(plain)
    assert np.abs(a - b).max() < 1e-6
    edge = [r for r in rows(out) if r["tier"] == "edge"]
    assert all(r["secagg"] == {"members": 2, "survivors": 2, "t": 2, "failed": None, "saturated": 0} for r in edge)
    s, p = (json.loads((d / "summary.json").read_text()) for d in (out, plain))
    assert s["bytes"]["device-edge"]["up"] > p["bytes"]["device-edge"]["up"]  # keys, shares on top of the ring elements
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
