"""Split placement over real MPI: a split device trains what it would train whole, and learns."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import mpirun
from test_jobs import _tiny_config, check_ok, final_params, rows

pytestmark = pytest.mark.mpi


def topology(tmp_path, name: str, edge0: list[dict], edge1: list[dict]) -> str:
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "edges": [{"name": "edge0", "devices": edge0}, {"name": "edge1", "devices": edge1}]}))
    return str(path)


@pytest.mark.parametrize("weights", ["seeded", "on disk, full fine-tuning"])
def test_split_devices_equal_whole_devices(tmp_path, weights):
    """Two devices split at k=1 vs the same run with them whole: the same global adapter after 3
    rounds. The whole run is the reference of the semantics docs/split.md defines (SplitFedV1: each
    split device is a client training the whole model, its upper half on the edge): every device
    trains the whole, uncut model with plain torch (LocalTrainer: its own batches, a fresh optimiser,
    clipping by its global gradient norm), and the edge takes the sample-weighted mean. The split
    run must match it with two split devices of different shard sizes (Dirichlet shards), clipping
    on and binding (max_grad_norm 0.05), a whole device beside them, and 3 rounds of 2 edge rounds.
    With the weights on disk (source: path) a split device loads only its embeddings and block 0;
    the others load the whole model. That job also fine-tunes fully (peft.method: none): every
    parameter trains and travels, the embeddings on the device and the head on the edge.

    Tiny Llama (no dropout), one micro-batch per step: the cut is bit-exact
    (tests/unit/test_split.py) and SGD with momentum is per-parameter, so two optimisers over the
    two halves step like one. What remains is float32 rounding: the edge adds the upper-block
    updates to the devices' sum instead of the devices sending them, and the clip factor comes from
    float64 partial norms instead of torch's float32 norm (observed: 1.4e-9). (With Adam the same
    rounding moves near-zero-gradient coordinates by up to ~1e-5 over 12 steps, see test_deepspeed.py.)
    """
    model = {"source": "llama", "size": "tiny", "max_length": 24}
    if "on disk" in weights:
        import torch

        from hierfed.config import ModelConfig
        from hierfed.model import load_tokenizer
        from hierfed.model.build import _base_model

        tok = load_tokenizer(ModelConfig(source="llama"))
        torch.manual_seed(0)
        _base_model(ModelConfig(source="llama"), "classification", 4, tok).save_pretrained(tmp_path / "m")
        tok.save_pretrained(tmp_path / "m")
        model = {"source": "path", "path": str(tmp_path / "m"), "max_length": 24}
    peft = {"method": "none"} if "full fine-tuning" in weights else {}
    cfg = _tiny_config(tmp_path, model=model, train={"optimizer": "sgd", "momentum": 0.9, "lr": 0.05, "batch_size": 8, "max_grad_norm": 0.05},
                       data={"partition": "dirichlet", "alpha": 0.5},
                       schedule={"rounds": 3, "tau1": 2, "tau2": 2}, split={"micro_batches": 1}, peft=peft)
    split = topology(tmp_path, "split", [{"ranks": 2, "split_layers": 1}, {"ranks": 1}], [{"ranks": 2}])
    whole = topology(tmp_path, "whole", [{"ranks": 3}], [{"ranks": 2}])
    check_ok(mpirun(8, "run", split, "--config", cfg, "--out", str(tmp_path / "a")))
    check_ok(mpirun(8, "run", whole, "--config", cfg, "--out", str(tmp_path / "b")))
    from hierfed.data import load_data, partition
    from hierfed.data.schema import DataConfig

    data = DataConfig(train_samples=400, eval_samples=64, partition="dirichlet", alpha=0.5)
    shards = [len(p) for p in partition(load_data(data).train, 5, "dirichlet", alpha=0.5, seed=data.seed)]
    assert shards[0] != shards[1]  # the split devices' shards (155 and 140): an unweighted mean would differ
    a, b = final_params(tmp_path / "a"), final_params(tmp_path / "b")
    assert np.abs(a).max() > 0.01
    assert np.abs(a - b).max() <= 1e-6
    up = json.loads((tmp_path / "a" / "summary.json").read_text())["bytes"]["device-edge"]["up"]
    assert up > json.loads((tmp_path / "b" / "summary.json").read_text())["bytes"]["device-edge"]["up"]  # activations


def test_split_devices_learn_pipelined_and_resume_exactly(tmp_path):
    """One job for everything a resume must carry (three jobs: whole, stopped at round 2, resumed):
    two split devices on one edge (GPT-2: dropout, and an LM head tied to the embeddings, a frozen
    matrix both sides hold), a mixed edge beside it, 4 pipelined micro-batches, fp16 activations,
    Adam state kept across rounds on both sides of the cut (split.optimizer_state: persistent);
    server momentum at both tiers and client sampling (3 of 4 per cloud round); every link
    compressed (error-feedback residuals on the top-k uplink, held copies on the downlinks);
    checkpoints every 2 rounds (each edge's momentum in its own rank state file of round 2).
    The causal-LM loss falls; the resumed job ends bit for bit on the uninterrupted job's adapter.
    (The tiny GPT-2 stays at chance on the 4-class `topics` task in this budget, so a falling
    classification loss would be a coin toss; the LM loss starts at ln|V| and falls steadily.)"""
    cfg = _tiny_config(tmp_path, data={"source": "corpus"}, schedule={"rounds": 3, "tau1": 3, "tau2": 2, "client_fraction": 0.75},
                       split={"micro_batches": 4, "activation_codec": "fp16", "optimizer_state": "persistent"},
                       aggregation={"edge": {"name": "fedavgm"}, "cloud": {"name": "fedavgm"}}, checkpoint={"every": 2},
                       compression={"device_up": "topk:0.2 > int8", "edge_up": "int8", "edge_down": "fp16", "cloud_down": "int4"})
    topo = topology(tmp_path, "mixed", [{"ranks": 2, "split_layers": 1}], [{"ranks": 1, "split_layers": 1}, {"ranks": 1}])
    whole_run, parts = tmp_path / "whole", tmp_path / "parts"
    check_ok(mpirun(7, "run", topo, "--config", cfg, "--out", str(whole_run)))
    cloud = [r for r in rows(whole_run) if r["tier"] == "cloud" and r["round"] > 0]
    assert cloud[-1]["loss"] < cloud[0]["loss"]
    edge_rows = [r for r in rows(whole_run) if r["tier"] == "edge" and (r["edge"] == "edge0" or "edge_phases" in r["seconds"])]
    assert len(edge_rows) >= 6  # edge0 serves a split device every edge round (it holds 2 of the 3 sampled)
    for r in edge_rows:  # the split link's phase times: complete, inside the edge round, busy = all but waiting
        sec = r["seconds"]
        assert set(sec["edge_phases"]) == {"wait_activation", "decode", "compute", "encode", "wait_send", "step"}
        assert set(sec["device_phases"]) == {"compute", "encode", "wait_send", "wait_gradient", "decode", "step"}
        assert sec["edge_phases"]["compute"] > 0 and sec["device_phases"]["compute"] > 0
        assert sum(sec["edge_phases"].values()) <= sec["wall"]
        assert sec["edge_busy"] == pytest.approx(sum(v for k, v in sec["edge_phases"].items() if k != "wait_activation"))
    check_ok(mpirun(7, "run", topo, "--config", cfg, "--out", str(parts), "--rounds", "2"))
    check_ok(mpirun(7, "run", topo, "--config", cfg, "--out", str(parts), "--resume"))
    np.testing.assert_array_equal(final_params(parts), final_params(whole_run))
    assert [r["round"] for r in rows(parts) if r["tier"] == "cloud"] == [0, 1, 2, 3]
    assert (parts / "checkpoints" / "ranks" / "round-0002" / "rank-00002.npz").exists()  # a device's residuals
    # split.optimizer_state: persistent: both edges (keys split/<device rank>/<param>/<state>) and
    # the split devices sampled so far (split/<param>/<state>) checkpoint their Adam state
    saved = [[k for k in np.load(f) if k.startswith("split/")] for f in (parts / "checkpoints" / "ranks" / "round-0002").glob("rank-*.npz")]
    assert sum(bool(keys) and keys[0].count("/") == 3 for keys in saved) == 2
    assert sum(bool(keys) and keys[0].count("/") == 2 for keys in saved) >= 1
    # Each edge keeps its own FedAvgM velocity in its rank state file; nothing model-sized of an
    # edge's travels pickled to the cloud or sits in the cloud's checkpoint.
    edges = [r["rank"] for r in json.loads((parts / "ranks.json").read_text()) if r["role"] in ("edge0", "edge1")]
    assert len(edges) == 2
    for rank in edges:
        with np.load(parts / "checkpoints" / "ranks" / "round-0002" / f"rank-{rank:05d}.npz") as z:
            assert z["strategy/velocity"].shape == final_params(parts).shape and np.abs(z["strategy/velocity"]).max() > 0
    with np.load(parts / "checkpoints" / "round-0002" / "state.npz") as z:
        assert not [k for k in z.files if k.startswith("edge")]


def test_auto_split_devices_that_fit_whole_train_whole(tmp_path):
    """`split_layers: auto` on a device the whole model fits resolves to the whole model: it trains
    whole, and the edges agree. edge0 (a 2-rank ZeRO group) serves only its second device, which
    every rank must assign to the same edge rank; edge1's only device trains whole, so edge1
    serves no split device at all."""
    import yaml

    cfg = _tiny_config(tmp_path, model={"source": "llama", "size": "tiny", "max_length": 24},
                       schedule={"rounds": 1, "tau1": 2, "tau2": 1}, deepspeed={"zero_stage": 1})
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump({"name": "auto", "edges": [
        {"name": "edge0", "ranks": 2, "devices": [{"ranks": 1, "split_layers": "auto", "memory_gb": 16}, {"ranks": 1, "split_layers": 1}]},
        {"name": "edge1", "devices": [{"ranks": 1, "split_layers": "auto", "memory_gb": 16}]}]}))
    out = tmp_path / "run"
    check_ok(mpirun(7, "run", str(path), "--config", cfg, "--out", str(out), timeout=240))
    edge = {r["edge"]: r for r in rows(out) if r["tier"] == "edge"}
    assert edge["edge0"]["clients"] == 2 and "edge_phases" in edge["edge0"]["seconds"]  # its split device was served
    assert edge["edge1"]["clients"] == 1 and "edge_phases" not in edge["edge1"]["seconds"]  # nothing split on edge1


def test_impossible_memory_budget_is_rejected_before_launch(tmp_path):
    from conftest import hierfed

    topo = topology(tmp_path, "tiny-phone", [{"ranks": 1, "split_layers": "auto", "memory_gb": 0.001}, {"ranks": 1}], [{"ranks": 2}])
    proc = hierfed("run", topo, "--rounds", "1", timeout=120)
    assert proc.returncode == 2
    assert "not even 1 block fits" in proc.stderr and "edge0/d0" in proc.stderr
    assert "launching" not in proc.stdout
