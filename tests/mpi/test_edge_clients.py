"""An edge that trains a client of its own (`train_locally: true`): a client like any device's,
on one rank or data-parallel over a DeepSpeed ZeRO edge group."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from conftest import mpirun
from test_jobs import _tiny_config, check_ok, final_params, rows

pytestmark = pytest.mark.mpi

# SGD, so that float32 summation-order noise stays at its own size (Adam turns ~1e-8 differences on
# near-zero gradients into ~1e-6 moves, see test_deepspeed.py). Observed: 7e-9 against flat FedAvg,
# 1e-8 for ZeRO-2 against one rank. 1e-7 is ten float32 ulps of the adapter's largest values (~0.15).
ATOL = 1e-7


def _config(tmp_path) -> str:
    # A tiny Llama (no dropout) as a causal LM: the ZeRO slices of a batch hold different numbers of
    # target tokens, so this also checks that each rank's loss is weighted by its share of them.
    return _tiny_config(tmp_path, model={"source": "llama", "size": "tiny", "max_length": 24},
                        data={"source": "corpus", "train_samples": 400, "eval_samples": 64},
                        train={"lr": 0.5, "batch_size": 8, "optimizer": "sgd"}, schedule={"rounds": 2, "tau1": 2, "tau2": 1})


def _topology(tmp_path, name: str, data: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **data}))
    return str(path)


def _own(tmp_path, edge_ranks: int) -> str:
    """edge0 trains client 2 itself (on edge_ranks ranks) beside its device (client 0); edge1 has client 1."""
    return _topology(tmp_path, f"own{edge_ranks}", {"edges": [
        {"name": "edge0", "ranks": edge_ranks, "train_locally": True, "devices": [{"ranks": 1}]},
        {"name": "edge1", "devices": [{"ranks": 1}]},
    ]})


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """The edge's client on the edge's single rank, plain torch: the reference."""
    tmp = tmp_path_factory.mktemp("own1")
    out = tmp / "run"
    check_ok(mpirun(5, "run", _own(tmp, 1), "--config", _config(tmp), "--out", str(out)))
    return out


def test_an_edge_client_trains_like_a_device(one_rank, tmp_path):
    """With tau2 = 1 a hierarchy is flat FedAvg: the same 3 clients (the edge's own one being
    client 2) on 3 flat devices give the same global adapter."""
    flat = tmp_path / "flat"
    check_ok(mpirun(4, "run", _topology(tmp_path, "flat3", {"devices": [{"ranks": 3}]}), "--config", _config(tmp_path), "--out", str(flat)))
    a, b = final_params(one_rank), final_params(flat)
    assert np.abs(a).max() > 0.05
    np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)
    edge0 = [r for r in rows(one_rank) if r.get("edge") == "edge0"]
    assert all(r["clients"] == 2 and r["seconds"]["compute"] > 0 for r in edge0)  # its device and itself


def _zero(tmp_path, stage: int, *args: str):
    out = tmp_path / f"zero{stage}"
    check_ok(mpirun(6, "run", _own(tmp_path, 2), "--config", _config(tmp_path), "--set", f"deepspeed.zero_stage={stage}", "--out", str(out), *args))
    return out


@pytest.fixture(scope="module")
def zero1(tmp_path_factory):
    return _zero(tmp_path_factory.mktemp("zero1"), 1)


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_edge_group_trains_its_client_like_one_rank(one_rank, zero1, tmp_path, stage):
    """edge0 on 2 ranks under ZeRO-{1,3}: each rank trains half of every batch; same losses and adapter.
    (ZeRO-2: tests/mpi/test_deepspeed.py.)"""
    out = zero1 if stage == 1 else _zero(tmp_path, stage)
    np.testing.assert_allclose(final_params(out), final_params(one_rank), rtol=0, atol=ATOL)
    losses = [[r["loss"] for r in rows(run) if r["tier"] == "edge"] for run in (out, one_rank)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


def test_resumed_zero_edge_client_equals_the_uninterrupted_run(zero1, tmp_path):
    """Stopped after round 1 and resumed: the edge's client starts each round afresh, so the
    resumed job ends on exactly the uninterrupted job's adapter."""
    _zero(tmp_path, 1, "--rounds", "1")
    out = _zero(tmp_path, 1, "--resume")
    np.testing.assert_array_equal(final_params(out), final_params(zero1))


def test_edge_client_with_sampling_and_compressed_links(tmp_path):
    """Client sampling (2 of 3 clients per round: some rounds without the edge's own client) and
    int8 links on a 2-rank ZeRO edge: leader and follower agree on every round, the rows count
    the sampled clients, and only the devices' links carry (compressed) bytes."""
    from hierfed.roles.protocol import sampled_clients

    out = tmp_path / "sampled"
    check_ok(mpirun(6, "run", _own(tmp_path, 2), "--config", _config(tmp_path), "--out", str(out), "--rounds", "3", "--seed", "2",
                    "--set", "schedule.client_fraction=0.67", "--set", "compression.device_up=int8", "--set", "compression.edge_down=int8"))
    edge0 = {0, 2}  # its device's client and its own
    rounds = {t: set(sampled_clients(3, 0.67, 2, t).tolist()) for t in (1, 2, 3)}
    assert [2 in s for s in rounds.values()] == [False, True, True] and 0 not in rounds[3]  # seed 2: every case
    for r in rows(out):
        if r.get("edge") == "edge0":
            assert r["clients"] == len(rounds[r["round"]] & edge0)
            assert np.isfinite(r["loss"]) if r["clients"] else r["loss"] is None
            if 0 in rounds[r["round"]]:  # its device trained: its update travelled in int8
                assert 0 < r["bytes"]["device-edge"]["up"] < r["bytes_uncompressed"]["device-edge"]["up"] / 3
