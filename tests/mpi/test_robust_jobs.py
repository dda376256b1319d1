"""Robust and LoRA-aware aggregation in real MPI jobs (the gathered path, hierfed.comm.links).

One Byzantine client (client 0 of edge0, HIERFED_INJECT_ATTACK=scale:100:0) sends its update times
100 in two jobs on the same topology, data and seeds: with FedAvg at the edges the global model
collapses; with the coordinate-wise median at the edges it learns as a clean run does. The median
job also runs exact LoRA aggregation at the cloud (lora_exact: the edges' B A products averaged and
re-factorised to rank r) with an fp16 uplink to the cloud, decoded per edge. A third, tiny job trains
FFA-LoRA (A frozen)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from conftest import job_env, mpirun
from test_jobs import TINY, _tiny_config, check_ok, rows

pytestmark = pytest.mark.mpi

# 2 edges x 1 device rank x 3 virtual clients: 5 ranks, 6 clients (clients 0-2 under edge0)
TOPOLOGY = {"name": "robust-2x3", "description": "2 edges, each 1 device rank with 3 virtual clients",
            "edges": [{"name": f"edge{i}", "devices": [{"ranks": 1, "clients": 3}]} for i in range(2)]}
# MiniLM (pretrained) learns the topics task in a few rounds; the tiny random models do not.
RUN = {"model": {"source": "minilm", "max_length": 24}, "data": {"train_samples": 300, "eval_samples": 64},
       "train": {"lr": 0.01, "batch_size": 8}, "schedule": {"rounds": 2, "tau1": 3, "tau2": 1},
       "compression": {"edge_up": "fp16"}, "runtime": {"progress": False}}
ATTACK = "scale:100:0"


def _job(tmp, name: str, **aggregation) -> tuple:
    topo, cfg = tmp / "topology.yaml", tmp / f"{name}.yaml"
    topo.write_text(yaml.safe_dump(TOPOLOGY))
    cfg.write_text(yaml.safe_dump({**RUN, "aggregation": aggregation}))
    env = job_env()
    env["HIERFED_INJECT_ATTACK"] = ATTACK
    out = tmp / name
    check_ok(mpirun(5, "run", str(topo), "--config", str(cfg), "--out", str(out), env=env))
    return out, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    return {"fedavg": _job(tmp, "fedavg"),
            "median": _job(tmp, "median", edge={"name": "median"}, cloud={"name": "lora_exact"})}


def test_a_median_edge_keeps_learning_where_fedavg_collapses_under_a_scaled_update(attacked):
    """Chance is 0.25; MiniLM learns the topics task in these rounds (the default job's floor is
    0.85). The median at the edges ignores the ×100 update and ends above 0.7; FedAvg at the edges lets it through and ends near
    chance with an eval loss far above the untrained model's."""
    (_, fedavg), (_, median) = attacked["fedavg"], attacked["median"]
    assert median["final"]["eval_accuracy"] >= 0.7
    assert fedavg["final"]["eval_accuracy"] <= 0.45
    assert fedavg["final"]["eval_loss"] > 2 * fedavg["initial"]["eval_loss"]
    assert median["final"]["eval_loss"] < median["initial"]["eval_loss"]


def test_gathered_updates_are_counted_in_the_ledger(attacked):
    """Every client's update travels on its own to the median edges (float32 behind a codec header,
    with its weight and length), every edge's fp16 update to the lora_exact cloud: the counted bytes
    are exactly these messages. FedAvg's SUM-reduced device uplink carries one [Σ w·Δ, Σ w] per rank."""
    from hierfed.comm.codecs import parse_codec

    (fout, fedavg), (mout, median) = attacked["fedavg"], attacked["median"]
    dim, rounds = median["trainable_params"], median["rounds"]
    per_update = 16 + parse_codec("identity").encoded_size(dim)  # [f64 weight][u64 length][payload]
    message = 3 * per_update + 8  # a device rank's 3 clients stacked, + the 8-byte size
    assert median["bytes"]["device-edge"]["up"] == rounds * 2 * message
    assert fedavg["bytes"]["device-edge"]["up"] == rounds * 2 * 3 * (dim + 1) * 4  # counted once per sender it stands for
    edge_up = 16 + parse_codec("fp16").encoded_size(dim) + 8
    assert median["bytes"]["edge-cloud"]["up"] == fedavg["bytes"]["edge-cloud"]["up"] == rounds * 2 * edge_up
    # each tier's row says what its rule saw: 3 updates at an edge, 2 at the cloud
    r = rows(mout)
    assert all(x["aggregation"] == {"rule": "median", "updates": 3} for x in r if x["tier"] == "edge")
    cloud = [x for x in r if x["tier"] == "cloud" and x["round"] > 0]
    assert [x["aggregation"]["updates"] for x in cloud] == [2] * rounds
    assert "aggregation" not in next(x for x in rows(fout) if x["tier"] == "edge")


def test_each_client_reports_the_norm_of_the_update_it_sent(attacked):
    """Every device client's `work` entry carries the L2 norm of the update it sent (after the
    injected attack, before codecs): client 0's is its own update times 100, so about 100 times the
    honest clients' (AdamW's steps give every honest client a similar norm), in both jobs."""
    for out, _ in attacked.values():
        edge = [x for x in rows(out) if x["tier"] == "edge"]
        for x in edge:
            norms = {w["client"]: w["norm"] for w in x["work"]}
            assert len(norms) == 3 and all(np.isfinite(v) and v > 0 for v in norms.values())
        for t in {x["round"] for x in edge}:
            norms = {w["client"]: w["norm"] for x in edge if x["round"] == t for w in x["work"]}
            assert sorted(norms) == list(range(6))
            honest = [norms[c] for c in range(1, 6)]
            assert max(honest) < 3 * min(honest)
            assert 30 * max(honest) < norms[0] < 300 * min(honest)


def test_exact_lora_aggregation_at_the_cloud_reports_its_residual_energy(attacked):
    """Two edges' rank-r products sum to rank <= 2r: the truncation to r drops a small, positive
    fraction of ||ΔW||_F² (reported per round), and the checkpointed factors are the re-factorised
    ones: each module's B' A' has rank <= r with B'ᵀB' = A'A'ᵀ (the even split of the singular values)."""
    from safetensors.numpy import load_file

    out, _ = attacked["median"]
    cloud = [x for x in rows(out) if x["tier"] == "cloud" and x["round"] > 0]
    for x in cloud:
        agg = x["aggregation"]
        assert agg["rule"] == "lora_exact"
        assert 0 < agg["residual_energy"] <= agg["residual_energy_max"] < 0.5
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    saved = load_file(str(ckpt / "adapter_model.safetensors"))  # the global params as PEFT's adapter (float32)
    a_keys = [k for k in saved if ".lora_A." in k]
    assert a_keys
    for k in a_keys:
        a = saved[k].astype(np.float64)
        b = saved[k.replace(".lora_A.", ".lora_B.")].astype(np.float64)
        np.testing.assert_allclose(b.T @ b, a @ a.T, rtol=0, atol=1e-5 * max(1.0, np.abs(a @ a.T).max()))


def test_ffa_lora_keeps_every_a_factor_at_its_seeded_initialisation(tmp_path):
    """peft.ffa_lora on a flat job (tiny GPT-2, 2 clients): lora_A is frozen, so only B and the head
    travel; the checkpointed adapter's A factors equal a fresh build's (the seed's) after training,
    while B has moved from its zero start."""
    import torch
    from safetensors.torch import load_file

    from hierfed.config import load_config
    from hierfed.data import load_data
    from hierfed.model import FlatView, build_model

    flat = {"name": "flat-1x2", "description": "1 device rank with 2 clients", "devices": [{"ranks": 1, "clients": 2}]}
    topo = tmp_path / "flat.yaml"
    topo.write_text(yaml.safe_dump(flat))
    cfg_path = _tiny_config(tmp_path, peft={"ffa_lora": True})
    out = tmp_path / "ffa"
    check_ok(mpirun(2, "run", str(topo), "--config", cfg_path, "--out", str(out)))
    cfg = load_config(cfg_path)
    task = load_data(cfg.data)
    built = build_model(cfg.model, cfg.peft, task.kind, task.num_labels, cfg.seed)
    fresh = dict(built.model.named_parameters())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == FlatView(built.model).dim
    assert not any("lora_A" in n for n, _ in FlatView(built.model).manifest())
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    a_keys = [k for k in saved if "lora_A" in k]
    b_keys = [k for k in saved if "lora_B" in k]
    assert a_keys and b_keys
    for k in a_keys:  # PEFT's saved names drop the adapter name: match on the module path
        name = next(n for n in fresh if "lora_A" in n and n.replace(".default", "") == k)
        torch.testing.assert_close(saved[k], fresh[name].detach().cpu(), rtol=0, atol=0)
    assert max(saved[k].abs().max().item() for k in b_keys) > 0  # B trained (it starts at zero)
    assert TINY["schedule"]["rounds"] == summary["rounds"]
