"""DP-FedAvg end to end over MPI: the wrappers with nothing to do are plain FedAvg bit for bit; with
noise, ε per round in metrics.jsonl equals the accountant's, and privacy.target_epsilon ends the
run, checkpointed, before the round that would exceed it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import mpirun
from test_jobs import _tiny_config, check_ok, final_params, rows

from hierfed.config import load_config
from hierfed.privacy import Accountant

pytestmark = pytest.mark.mpi


def test_dp_wrappers_with_infinite_clip_and_no_noise_equal_plain_fedavg(tmp_path):
    """privacy.clip: .inf, σ = 0: every client's update goes through the clipping wrapper and the
    tiers' strategies through NoisySum, and the adapter is plain FedAvg's, bit for bit."""
    plain, wrapped = tmp_path / "plain", tmp_path / "wrapped"
    cfg = _tiny_config(tmp_path, schedule={"rounds": 2, "tau1": 2, "tau2": 2})
    check_ok(mpirun(7, "run", "default", "--config", cfg, "--out", str(plain)))
    check_ok(mpirun(7, "run", "default", "--config", cfg, "--out", str(wrapped), "--set", "privacy.clip=.inf"))
    np.testing.assert_array_equal(final_params(wrapped), final_params(plain))
    assert np.abs(final_params(plain)).max() > 0


def test_noisy_run_reports_epsilon_and_stops_at_the_target(tmp_path):
    """Noise at the edges, Poisson sampling: ε per cloud round is the accountant's and grows; the target
    allows 2 of 4 rounds, so the run ends after round 2 with its checkpoint, and says why."""
    sets = {"privacy": {"clip": 0.5, "noise_multiplier": 2.0, "noise_at": "edge"},
            "schedule": {"rounds": 4, "tau1": 2, "tau2": 2, "sampling": "poisson", "client_fraction": 0.75}}
    probe = load_config(_tiny_config(tmp_path, **sets))
    acc = Accountant(probe, flat=False, num_clients=4)
    sets["privacy"]["target_epsilon"] = (acc.epsilon(2) + acc.epsilon(3)) / 2
    cfg = _tiny_config(tmp_path, **sets)
    out = tmp_path / "dp"
    check_ok(mpirun(7, "run", "default", "--config", cfg, "--out", str(out)))
    cloud = [r for r in rows(out) if r["tier"] == "cloud" and r["round"] > 0]
    assert [r["round"] for r in cloud] == [1, 2]
    assert [r["epsilon"] for r in cloud] == pytest.approx([acc.epsilon(1), acc.epsilon(2)], rel=1e-12)
    assert cloud[0]["epsilon"] < cloud[1]["epsilon"] <= sets["privacy"]["target_epsilon"]
    assert np.all(np.isfinite(final_params(out)))
    assert (out / "checkpoints" / "latest").read_text().strip().endswith("2")
    s = json.loads((out / "summary.json").read_text())["privacy"]
    assert s["stopped_by_target"] is True and s["rounds"] == 2
    assert s["epsilon"] == pytest.approx(acc.epsilon(2), rel=1e-12)
