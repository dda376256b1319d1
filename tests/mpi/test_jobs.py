"""Real MPI jobs (the venv's mpiexec, several ranks on this machine): the run path end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import job_env, mpirun

pytestmark = pytest.mark.mpi

# A small, fast job: tiny GPT-2 classifier on the built-in topics task.
TINY = {
    "model": {"source": "gpt2", "size": "tiny", "max_length": 24},
    "data": {"train_samples": 400, "eval_samples": 64},
    "train": {"lr": 0.01, "batch_size": 8},
    "schedule": {"rounds": 2, "tau1": 2, "tau2": 1},
    "runtime": {"progress": False},
}


def final_params(out: Path) -> np.ndarray:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    with np.load(out / "checkpoints" / latest / "state.npz") as z:
        return z["params"]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def test_default_job_learns_and_writes_results(default_run):
    """The main job as README runs it under mpiexec: MiniLM + LoRA on 7 ranks, accuracy from chance to >= 0.85."""
    out, proc = default_run
    check_ok(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["initial"]["eval_accuracy"] < 0.4  # 4 classes: an untrained head is near chance
    assert summary["final"]["eval_accuracy"] >= 0.85
    # Only the adapter and head travel: each broadcast/reduce carries the trainable vector (+1 weight).
    dim = summary["trainable_params"]
    assert dim < 0.01 * summary["total_params"]
    rounds = summary["rounds"]
    tau2 = 2
    up = summary["bytes"]["device-edge"]["up"]
    assert up == rounds * tau2 * 4 * (dim + 1) * 4  # 4 devices, float32
    assert summary["bytes"]["edge-cloud"]["up"] == rounds * 2 * (dim + 1) * 4  # 2 edges
    # against full-model flat FedAvg (4 devices sending the whole model to the cloud): the adapter
    # instead of the model, and 2 edges instead of 4 devices (~600x)
    assert summary["cloud_link_reduction"] == pytest.approx(2 * summary["total_params"] / (dim + 1), rel=0.01)
    r = rows(out)
    assert {row["tier"] for row in r} == {"cloud", "edge"}
    edge_rows = [row for row in r if row["tier"] == "edge"]
    assert len(edge_rows) == rounds * tau2 * 2
    for row in r:
        assert {"round", "edge_round", "tier", "loss", "bytes", "seconds"} <= row.keys()
    assert "local compute" in proc.stdout and "device-edge" in proc.stdout  # the summary table
    # every rank's peak memory, by role: the MiniLM ranks hold a model (> 100 MB resident), the
    # edges only aggregate flat vectors; no GPU was used
    peak = summary["peak_memory"]
    assert set(peak) == {"cloud", "edge0", "edge1", "edge0/d0", "edge0/d1", "edge1/d0", "edge1/d1"}
    assert all(m["gpu"] is None and m["host"] > 0 for m in peak.values())
    assert min(peak[r]["host"] for r in ("cloud", "edge0/d0")) > 1e8
    # a plain edge aggregates flat vectors: it never imports torch or builds a model (~80 MB here;
    # ~470 MB when it did)
    assert max(peak[r]["host"] for r in ("edge0", "edge1")) < 1.5e8


# The tiny default run trains LoHa on a tiny Llama (LoRA is the main job's, tested throughout;
# peft's LoHa has no GPT-2 Conv1D layer).
LOHA = {"peft": {"method": "loha"}, "model": {"source": "llama", "size": "tiny", "max_length": 24}}


@pytest.fixture(scope="module")
def tiny_default(tmp_path_factory):
    """The tiny Llama config with LoHa adapters on the default topology (7 ranks), run once for the
    tests that read it."""
    tmp = tmp_path_factory.mktemp("tiny")
    out = tmp / "run"
    check_ok(mpirun(7, "run", "default", "--config", _tiny_config(tmp, **LOHA), "--out", str(out)))
    return out


def test_checkpoint_is_a_peft_adapter(tiny_default):
    """The cloud's checkpoint (LoHa here) loads with PeftModel.from_pretrained and holds the global parameters."""
    out = tiny_default
    import torch
    from peft import PeftModel

    from hierfed.config import ModelConfig
    from hierfed.model import FlatView, load_tokenizer
    from hierfed.model.build import _base_model

    mcfg = ModelConfig(source="llama", size="tiny", max_length=24)
    tok = load_tokenizer(mcfg)
    torch.manual_seed(0)
    base = _base_model(mcfg, "classification", 4, tok)
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    model = PeftModel.from_pretrained(base, str(latest), is_trainable=True)
    got = FlatView(model).get()
    np.testing.assert_array_equal(got, final_params(out).astype(np.float32))


def _tiny_config(tmp_path: Path, **sections) -> str:
    import yaml

    data = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    path = tmp_path / f"run-{len(list(tmp_path.glob('run-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_hierarchy_with_tau2_1_equals_flat_fedavg(tiny_default, tmp_path):
    """Two-level averaging by sample counts is one-level FedAvg: same devices, same data, same result."""
    hier, flat = tiny_default, tmp_path / "flat"
    check_ok(mpirun(5, "run", "flat", "--config", _tiny_config(tmp_path, **LOHA), "--out", str(flat)))
    a, b = final_params(hier), final_params(flat)
    assert np.abs(a - b).max() <= 1e-6
    assert np.abs(a).max() > 0


def test_uneven_topology_causal_lm(tmp_path):
    """Uneven fan-outs (3 devices and 1) with a tiny Llama and LoKr adapters on the built-in corpus,
    saved as a datasets directory (data.source: disk: every rank keeps it memory-mapped and reads
    only the rows it uses, hierfed.data.files.Rows): eval loss falls. With `eval_every: 2` the cloud
    evaluates rounds 0, 2 and the last (3), not round 1."""
    import datasets

    from hierfed.data import DataConfig, load_data

    corpus = load_data(DataConfig(source="corpus", train_samples=400, eval_samples=64))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [e.text for e in corpus.train]}),
                          "validation": datasets.Dataset.from_dict({"text": [e.text for e in corpus.eval]})}).save_to_disk(str(tmp_path / "corpus"))
    cfg = _tiny_config(tmp_path, model={"source": "llama", "size": "tiny", "max_length": 24}, peft={"method": "lokr"},
                       data={"source": "disk", "path": str(tmp_path / "corpus")},
                       schedule={"rounds": 3, "tau1": 4, "tau2": 2, "eval_every": 2})
    out = tmp_path / "uneven"
    proc = mpirun(7, "run", "uneven", "--config", cfg, "--out", str(out))
    check_ok(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]
    evaluated = {r["round"]: "eval_loss" in r for r in rows(out) if r["tier"] == "cloud"}
    assert evaluated == {0: True, 1: False, 2: True, 3: True}
    edges = {r["edge"]: r["clients"] for r in rows(out) if r["tier"] == "edge" and r["round"] == 1 and r["edge_round"] == 1}
    assert sorted(edges.values()) == [1, 3]


def test_world_size_mismatch_fails_fast(tmp_path):
    started = time.monotonic()
    proc = mpirun(5, "run", "default", "--out", str(tmp_path / "x"), timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - started < 30
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "7 ranks" in lines[0] and "has 5" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("victim", ["edge0/d1", "edge1", "cloud"])
def test_a_failing_rank_ends_the_job(tmp_path, victim):
    """An exception on one rank aborts every rank: the job exits non-zero instead of hanging."""
    env = job_env()
    env["HIERFED_INJECT_FAILURE"] = victim
    started = time.monotonic()
    proc = mpirun(7, "run", "--config", _tiny_config(tmp_path), "--out", str(tmp_path / "x"), env=env, timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - started < 90
    assert f"({victim}): RuntimeError: injected failure" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_crash_while_ranks_save_a_round_resumes_from_the_last_complete_checkpoint(tmp_path):
    """Device edge0/d0 dies after sending its round-2 update but before saving its round-2
    error-feedback residuals, while the cloud writes its own checkpoint of round 2: `latest` still
    names round 1, which every rank saved, and --resume continues from there to the end. (Before:
    `latest` named round 2 and the resume stopped on d0's missing file.)

    The edges run FedAdam and the cloud FedAdagrad (adaptive servers at both tiers, issue 13): each
    edge's m and v are in its own rank state file, the cloud's in its checkpoint, and the resumed
    run's round 2 is bit for bit the uninterrupted run's (the cloud's round-2 checkpoint written
    before d0 died), which needs round 1's error-feedback residuals and both tiers' m and v back."""
    cfg = _tiny_config(tmp_path, schedule={"rounds": 3, "tau1": 2, "tau2": 1}, compression={"device_up": "topk:0.2 > int8"},
                       peft={"method": "ia3"},  # IA3 trains end to end here (LoRA: the main job; LoHa, LoKr: above)
                       aggregation={"edge": {"name": "fedadam"}, "cloud": {"name": "fedadagrad"}})
    out = tmp_path / "run"
    env = job_env()
    env["HIERFED_INJECT_FAILURE"] = "save:edge0/d0:2"
    proc = mpirun(7, "run", "--config", cfg, "--out", str(out), env=env, timeout=180)
    assert proc.returncode != 0 and "injected failure before saving round 2" in proc.stderr, proc.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert (ckpts / "round-0002" / "state.npz").exists()  # the cloud had written round 2 ...
    assert not (ckpts / "ranks" / "round-0002" / "rank-00002.npz").exists()  # ... d0 had not
    assert (ckpts / "latest").read_text().strip() == "round-0001"
    with np.load(ckpts / "round-0002" / "state.npz") as z:
        whole = z["params"].copy()  # the uninterrupted run's round 2
    dim = whole.size
    with np.load(ckpts / "round-0001" / "state.npz") as z:  # the cloud's FedAdagrad state, in its checkpoint
        cloud = {k: z[k] for k in z.files if k.startswith("cloud/strategy/")}
    assert sorted(cloud) == ["cloud/strategy/m", "cloud/strategy/v"] and all(v.shape == (dim,) for v in cloud.values())
    edges = []
    for rank in (1, 4):  # edge0, edge1: each edge's FedAdam state, in its own rank state file
        with np.load(ckpts / "ranks" / "round-0001" / f"rank-{rank:05d}.npz") as z:
            edges.append({k: z[k] for k in z.files if k.startswith("strategy/")})
    assert all(sorted(e) == ["strategy/m", "strategy/v"] and e["strategy/m"].shape == (dim,) for e in edges)
    assert np.abs(edges[0]["strategy/m"] - edges[1]["strategy/m"]).max() > 0  # each edge its own state ...
    assert np.abs(edges[0]["strategy/m"] - cloud["cloud/strategy/m"]).max() > 0  # ... and the cloud another
    check_ok(mpirun(7, "run", "--config", cfg, "--out", str(out), "--resume"))
    assert [r["round"] for r in rows(out) if r["tier"] == "cloud"] == [0, 1, 2, 3]
    assert (ckpts / "latest").read_text().strip() == "round-0003"
    np.testing.assert_array_equal(np.load(ckpts / "round-0002" / "state.npz")["params"], whole)  # resumed: the same round 2
    assert np.abs(final_params(out) - whole).max() > 0  # IA3 trained in round 3


def test_a_rank_failing_its_preflight_ends_every_rank(tmp_path):
    """Under a plain mpiexec (no launcher of ours), one rank's pre-flight fails (a path missing on
    its node): the ranks agree on it before building communicators, so nobody waits in Split; the
    failing rank's line is printed once and every rank exits 2."""
    env = job_env()
    env["HIERFED_INJECT_FAILURE"] = "preflight:3"
    proc = mpirun(7, "run", "--no-launch", "--config", _tiny_config(tmp_path), "--out", str(tmp_path / "x"), env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hierfed: error")]
    assert lines == ["hierfed: error: rank 3: model.path: /nonexistent-on-rank-3 is not a directory"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _rank_pid(root_pid: int, rank: int) -> int | None:
    """The PID of MPI rank `rank` among `root_pid`'s descendants (from its environment: PMI_RANK under
    MPICH, OMPI_COMM_WORLD_RANK under Open MPI)."""
    import os

    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ranked = f"PMI_RANK={rank}".encode() in env or f"OMPI_COMM_WORLD_RANK={rank}".encode() in env
        if ranked and f"HIERFED_TEST_JOB={root_pid}".encode() in env and " python" in stat.replace("(", " "):
            return int(entry)
    return None


def test_a_rank_killed_with_sigkill_ends_the_job_naming_it(tmp_path):
    """Rank 4 (an edge) SIGKILLed mid-run (no exception, no handler) under `hierfed run`'s own launch:
    mpiexec ends every other rank, and hierfed names the rank that died and its role (MPICH's report
    names the pid of whichever process it reaped first, often one it killed itself; hierfed's
    launcher watched the ranks listed in out/ranks.json); nothing is left waiting. (The issue asks for 10 s; measured here ~1 s,
    and bounded generously because the host is loaded.)"""
    import os
    import signal
    import subprocess

    from conftest import BIN, ROOT

    cfg = _tiny_config(tmp_path, schedule={"rounds": 50, "tau1": 2, "tau2": 1})
    out = tmp_path / "killed"
    env = job_env()
    env["HIERFED_TEST_JOB"] = str(os.getpid())
    job = subprocess.Popen([str(BIN / "hierfed"), "run", "--config", cfg, "--out", str(out)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists() or '"round": 1' not in (out / "metrics.jsonl").read_text():
            assert job.poll() is None and time.monotonic() < deadline, "the job ended or stalled before round 1"
            time.sleep(0.5)
        victim = _rank_pid(os.getpid(), 4)
        assert victim is not None, "rank 4's process not found"
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        output, _ = job.communicate(timeout=120)
        ended = time.monotonic() - killed
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    roles = {r["rank"]: r["role"] for r in json.loads((out / "ranks.json").read_text())}
    # named first: alone, or with a rank that mpiexec ended within the same poll of the launcher
    named = f"rank 4 ({roles[4]}, pid {victim} on node"
    assert f"hierfed: error: {named}" in output and "first rank to end" in output \
        or named in output and "were the first ranks to end (seen together)" in output, output[-2000:]
    print(f"the job ended {ended:.1f} s after rank 4 was killed")  # pytest -s shows it
    assert ended < 60, f"the job took {ended:.1f} s to end after rank 4 was killed"


def test_two_tiers_with_tau2_2_sampling_and_unequal_shards_match_a_numpy_hierfedavg(tmp_path):
    """A reference for τ2 > 1 that shares no aggregation code with hierfed: the `uneven` topology
    (edges of 3 and 1 devices), Dirichlet shards of unequal size, 3 of 4 clients sampled per cloud
    round, 2 cloud rounds of τ2 = 2 edge rounds of τ1 = 2 steps. Each client's local training is
    replayed here with the job's seeds; the two tiers of weighted averaging are written out below
    in numpy (edge: Σ n_c Δ_c / Σ n_c per edge round; cloud: the edges' whole changes weighted by
    the samples behind them, Σ_s Σ_c n_c)."""
    import torch

    from hierfed.config import load_config
    from hierfed.data import load_data, partition
    from hierfed.model import FlatView, build_model
    from hierfed.roles.protocol import round_clients
    from hierfed.seeding import derive_seed
    from hierfed.topology import load_topology
    from hierfed.training import LocalTrainer, tokenize

    cfg_path = _tiny_config(tmp_path, schedule={"rounds": 2, "tau1": 2, "tau2": 2, "client_fraction": 0.75},
                            data={"train_samples": 400, "eval_samples": 64, "partition": "dirichlet", "alpha": 1.0})
    out = tmp_path / "run"
    check_ok(mpirun(7, "run", "uneven", "--config", cfg_path, "--out", str(out)))

    torch.set_num_threads(1)
    cfg = load_config(cfg_path)
    placement = load_topology("uneven").placement()
    task = load_data(cfg.data)
    built = build_model(cfg.model, cfg.peft, task.kind, task.num_labels, cfg.seed, "cpu")
    flat, trainer = FlatView(built.model), LocalTrainer(built.model, cfg.train)
    shards = partition(task.train, placement.num_clients, cfg.data.partition, alpha=cfg.data.alpha, seed=cfg.data.seed)
    assert len({len(s) for s in shards}) > 1  # unequal shards
    data = [tokenize(built.tokenizer, [task.train[i] for i in s], task.kind, cfg.model.max_length) for s in shards]
    g = initial = flat.get().astype(np.float64)
    for t in (1, 2):
        sampled = round_clients(cfg, placement.num_clients, t)
        assert len(sampled) == 3
        g32 = g.astype(np.float32)  # what the cloud broadcasts
        change, samples = np.zeros_like(g), 0.0
        for edge in placement.edges:
            mine = sorted(edge.all_clients & sampled)
            if not mine:
                continue
            local, behind = g32.astype(np.float64), 0.0
            for s in (1, 2):
                start = local.astype(np.float32)
                total, weight = np.zeros_like(g), 0.0
                for c in mine:
                    flat.set(start)
                    trainer.train(data[c], cfg.schedule.tau1, derive_seed(cfg.seed, t, s, c))
                    total += len(shards[c]) * (flat.get() - start).astype(np.float64)
                    weight += len(shards[c])
                local = local + total / weight
                behind += weight
            change += behind * (local - g32)
            samples += behind
        g = g32 + change / samples
    got = final_params(out)
    assert np.abs(got - initial).max() > 1e-3  # it trained
    # The job sums w·Δ in float32 (the wire format), the reference in float64: observed max difference
    # 5e-6 on values up to 0.16 after two rounds. Weighting clients equally instead of by their
    # unequal shard sizes moves the result by orders of magnitude more than this bound.
    np.testing.assert_allclose(got, g, rtol=0, atol=2e-5)


def test_scaffold_two_tiers_killed_and_resumed_equals_the_uninterrupted_run_and_flat_scaffold(tmp_path):
    """SCAFFOLD (client.algorithm: scaffold) with a FedYogi cloud on the default topology, τ2 = 1,
    2 cloud rounds, with device edge0/d0 dying before it saves its round-2 control variates while
    the cloud writes its round-2 checkpoint (the uninterrupted run's parameters). Resumed from
    round 1 (devices' c_i, the edges' control variates from their rank state files, the cloud's c
    and its FedYogi m and v from its checkpoint), the job ends on exactly those parameters. The
    same clients under one flat SCAFFOLD server (FedYogi too) end on the same parameters (the
    two-tier composition of docs/aggregation.md: FedAvg edges with τ2 = 1 hand the cloud the flat
    mean delta), and the control-variate delta doubles the uplink."""
    cfg = _tiny_config(tmp_path, schedule={"rounds": 2, "tau1": 2, "tau2": 1}, train={"lr": 0.05, "batch_size": 8, "optimizer": "sgd"},
                       client={"algorithm": "scaffold"}, aggregation={"cloud": {"name": "fedyogi"}})
    out = tmp_path / "run"
    env = job_env()
    env["HIERFED_INJECT_FAILURE"] = "save:edge0/d0:2"
    proc = mpirun(7, "run", "default", "--config", cfg, "--out", str(out), env=env, timeout=180)
    assert proc.returncode != 0 and "injected failure before saving round 2" in proc.stderr, proc.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "round-0001"
    with np.load(ckpts / "round-0002" / "state.npz") as z:  # written by the cloud before d0 died: the uninterrupted run's
        whole = z["params"].copy()
    with np.load(ckpts / "round-0001" / "state.npz") as z:
        assert "cloud/client/c" in z.files  # the cloud's control variate is in its checkpoint ...
        assert z["cloud/strategy/m"].shape == z["cloud/strategy/v"].shape == whole.shape  # ... and its FedYogi state
        assert np.abs(whole - z["params"]).max() > 0
    for rank in (1, 4):  # each edge's control variate c_e is in its own rank state file (FedAvg edges: no strategy state)
        with np.load(ckpts / "ranks" / "round-0001" / f"rank-{rank:05d}.npz") as z:
            assert z["client/c"].shape == whole.shape and not any(k.startswith("strategy/") for k in z.files), z.files
    up = [r["bytes"]["device-edge"]["up"] for r in rows(out) if r["tier"] == "edge"]
    check_ok(mpirun(7, "run", "default", "--config", cfg, "--out", str(out), "--resume"))
    np.testing.assert_array_equal(final_params(out), whole)
    flat = tmp_path / "flat"
    check_ok(mpirun(5, "run", "flat", "--config", cfg, "--out", str(flat)))
    assert np.abs(final_params(flat) - whole).max() <= 1e-6
    dim = json.loads((flat / "summary.json").read_text())["trainable_params"]
    assert up and all(v == 2 * 4 * (2 * dim + 1) for v in up), (up, dim)  # 2 devices x [w·Δ, w, w·Δc] float32
