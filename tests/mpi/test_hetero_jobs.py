"""Heterogeneous, unreliable devices on real MPI ranks (docs/heterogeneity.md): a deadline with
partial work, dropouts and unreachable clients against a FedAvg computed here; FedBuff edges with
K = all and equal clocks against synchronous FedAvg; an asynchronous run stopped and resumed
against the uninterrupted one. Small 4-rank jobs (1 cloud, 1 edge, 2 device ranks)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import mpirun
from test_jobs import TINY

pytestmark = pytest.mark.mpi

BASE = {**TINY, "schedule": {"rounds": 1, "tau1": 4, "tau2": 1}}  # the tiny job of test_jobs, one round of 4 steps
# a laptop rank with 2 clients; a phone rank with 3 clients, ten times slower, unreliable
TOPOLOGY = {
    "links": {"device_edge": {"bandwidth_mbps": 100, "latency_ms": 10}},
    "device_classes": {"laptop": {"tflops": 0.001}, "phone": {"tflops": 0.0001, "availability": 0.7, "dropout": 0.3}},
    "edges": [{"devices": [{"ranks": 1, "clients": 2, "class": "laptop"}, {"ranks": 1, "clients": 3, "class": "phone"}]}],
}


def _write(tmp: Path, name: str, data: dict) -> str:
    path = tmp / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _config(tmp: Path, topology: dict, **sections) -> str:
    data = json.loads(json.dumps(BASE))
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    data["topology"] = _write(tmp, f"topo-{len(list(tmp.glob('topo-*')))}.yaml", topology)
    return _write(tmp, f"run-{len(list(tmp.glob('run-*')))}.yaml", data)


def _params(out: Path) -> np.ndarray:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    with np.load(out / "checkpoints" / latest / "state.npz") as z:
        return z["params"]


def _rows(out: Path, tier: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["tier"] == tier]


def _ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_deadline_partial_work_and_dropouts_against_a_numpy_fedavg(tmp_path):
    """One edge round, deadline 1.5 s, straggler partial. Seed 1 makes a phone unreachable, one
    vanish and one late. The row says so; each contributor's steps are the formula's, from the
    topology's rates and links (a phone fits 2 of its 4 steps); the cloud's model is the
    contributors' FedAvg, their updates trained here from the initial model with the same seeds."""
    import torch

    from hierfed.config import load_config
    from hierfed.data import load_data, partition
    from hierfed.model import FlatView, build_model
    from hierfed.seeding import derive_seed
    from hierfed.training import LocalTrainer, tokenize

    cfg_path = _config(tmp_path, TOPOLOGY, seed=1, schedule={"straggler": "partial", "deadline": 1.5})
    out = tmp_path / "run"
    _ok(mpirun(4, "run", "--config", cfg_path, "--out", str(out)))
    (row,) = _rows(out, "edge")
    assert (row["sampled"], row["available"], row["dropped"], row["late"], row["partial"]) == (5, 4, 1, 1, 1)
    assert row["deadline_s"] == 1.5 and row["span_s"] == 1.5
    dim = _params(out).size
    steps = {}
    for w in row["work"]:  # the formula, from the topology: down + k x step + up <= deadline
        rate = 1e12 * (0.001 if w["client"] < 2 else 0.0001)
        per_step = w["flops"] / w["steps"] / rate
        link = 0.010 + 8 * 4 * dim / 100e6, 0.010 + 8 * 4 * (dim + 1) / 100e6
        assert w["steps"] == min(4, math.floor((1.5 - sum(link)) / per_step))
        steps[w["client"]] = w["steps"]
    assert sorted(steps.values()) == [2, 4, 4]

    torch.set_num_threads(1)
    cfg = load_config(cfg_path)
    task = load_data(cfg.data)
    built = build_model(cfg.model, cfg.peft, task.kind, task.num_labels, cfg.seed, "cpu")
    flat, trainer = FlatView(built.model), LocalTrainer(built.model, cfg.train)
    start = flat.get().copy()
    shards = partition(task.train, 5, cfg.data.partition, alpha=cfg.data.alpha, seed=cfg.data.seed)
    total, weight = np.zeros(start.size), 0.0
    for c, k in steps.items():
        flat.set(start)
        trainer.train(tokenize(built.tokenizer, [task.train[i] for i in shards[c]], task.kind, cfg.model.max_length), k,
                      derive_seed(cfg.seed, 1, 1, c))
        total += len(shards[c]) * (flat.get() - start).astype(np.float64)
        weight += len(shards[c])
    oracle = start + total / weight
    got = _params(out)
    assert np.abs(got - start).max() > 1e-3  # it trained
    np.testing.assert_allclose(got, oracle, rtol=0, atol=2e-6)


EQUAL = {"edges": [{"devices": [{"ranks": 2, "clients": 2, "tflops": 0.01}]}]}


def test_fedbuff_with_k_all_and_equal_clocks_equals_synchronous_fedavg(tmp_path):
    """Four clients of equal speed (max_length 8: every client's batches are the same shape), K =
    all: every buffer holds each client once with staleness 0, so two rounds of two FedBuff edge
    updates end on the synchronous run's model."""
    sched = {"rounds": 2, "tau1": 2, "tau2": 2}
    model = {"source": "gpt2", "size": "tiny", "max_length": 8}
    sync, buff = tmp_path / "sync", tmp_path / "buff"
    _ok(mpirun(4, "run", "--config", _config(tmp_path, EQUAL, schedule=sched, model=model), "--out", str(sync)))
    _ok(mpirun(4, "run", "--config", _config(tmp_path, EQUAL, schedule={**sched, "edge_mode": "fedbuff"}, model=model),
               "--out", str(buff)))
    rows = _rows(buff, "edge")
    assert [r["arrivals"] for r in rows] == [4] * 4 and all(r["staleness"] == [0] * 4 for r in rows)
    a, b = _params(sync), _params(buff)
    assert np.abs(a - b).max() <= 1e-7
    assert np.abs(a).max() > 0


def test_async_edge_killed_and_resumed_equals_the_uninterrupted_run(tmp_path):
    """FedBuff with K = 2 over laptops and slow, unreliable phones: stale updates arrive (recorded
    per edge update). The same job killed with SIGKILL (every rank at once) as soon as its first
    checkpoint exists, then resumed, ends on the uninterrupted run's model and schedule."""
    import os
    import signal
    import subprocess
    import time

    from conftest import ROOT, job_env
    from hierfed.cluster.mpi import mpiexec_command

    cfg = _config(tmp_path, TOPOLOGY, seed=2, schedule={"rounds": 4, "tau1": 2, "tau2": 3, "edge_mode": "fedbuff", "buffer_k": 2})
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _ok(mpirun(4, "run", "--config", cfg, "--out", str(whole)))
    rows = _rows(whole, "edge")
    assert all(r["arrivals"] == 2 for r in rows)
    assert max(s for r in rows for s in r["staleness"]) > 0
    assert all(r["span_s"] >= 0 for r in rows)

    job = subprocess.Popen(mpiexec_command(4, ["run", "--config", cfg, "--out", str(parts)]),
                           cwd=ROOT, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = parts / "checkpoints" / "latest"
    try:
        while not latest.exists() and job.poll() is None:
            time.sleep(0.05)
        os.killpg(job.pid, signal.SIGKILL)
    finally:
        job.wait(timeout=60)
    killed_at = latest.read_text().strip()
    assert not (parts / "summary.json").exists(), "the job finished before it was killed"
    _ok(mpirun(4, "run", "--config", cfg, "--out", str(parts), "--resume"))
    np.testing.assert_array_equal(_params(parts), _params(whole))
    # the resumed rounds replayed the same schedule: arrivals, staleness, spans (the start-up plan's
    # control bytes land in the first round after a start, so the byte counts differ there)
    plan = [(r["round"], r["edge_round"], r["arrivals"], r["staleness"], r["span_s"]) for r in rows]
    assert [(r["round"], r["edge_round"], r["arrivals"], r["staleness"], r["span_s"]) for r in _rows(parts, "edge")] == plan
    assert killed_at < "round-0004"
