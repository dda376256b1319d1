"""Real MPI jobs on the fortunes workloads (Debian's packages, .ci/run installs them): the shelves
partition across the default topology's 4 clients and the cloud's per-group evaluation in
metrics.jsonl and summary.json; instruction data; the multilingual LM job, which also serves as
error feedback's workload (top-k uplinks, with a control run without feedback)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from conftest import mpirun
from hierfed.data import DataConfig, load_data

pytestmark = pytest.mark.mpi

DATA = {"source": "fortunes", "task": "category", "categories": 4, "shelf": 2, "partition": "shelves", "eval_samples": 64}
ROUNDS = 3  # of the LM job: rounds 2 and 3 are where error feedback makes its difference
# How much more the eval loss falls with error feedback than without (observed: 0.223 vs 0.134, 1.67x).
MARGIN = 1.3


def test_fortunes_shelves_job_reports_every_group(tmp_path):
    cfg = {"model": {"source": "gpt2", "size": "tiny", "max_length": 48}, "data": DATA,
           "train": {"lr": 0.01, "batch_size": 8}, "schedule": {"rounds": 2, "tau1": 2, "tau2": 1},
           "runtime": {"progress": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    proc = mpirun(7, "run", "--config", str(tmp_path / "run.yaml"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    task = load_data(DataConfig(**DATA))
    counts = {g: sum(e.group == g for e in task.eval) for g in task.groups}
    assert len(counts) == 2 and set(counts.values()) == {32}
    cloud = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cloud = [r for r in cloud if r["tier"] == "cloud"]
    assert [r["round"] for r in cloud] == [0, 1, 2]
    for r in cloud:
        groups = r["groups"]
        assert set(groups) == set(task.groups)
        # the groups partition the eval set: overall = the groups' metrics weighted by their sizes
        n = sum(counts.values())
        for key in ("eval_accuracy", "eval_loss"):
            assert np.isclose(r[key], sum(groups[g][key] * counts[g] for g in groups) / n)
        for g, m in groups.items():
            assert m["eval_accuracy"] * counts[g] == pytest.approx(round(m["eval_accuracy"] * counts[g]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["groups"] == cloud[-1]["groups"]
    assert summary["final"]["eval_accuracy"] == cloud[-1]["eval_accuracy"]
    assert not (out / "samples.txt").exists()  # classification: no generations


def test_instruction_tuning_job_scores_responses_and_counts_truncation(tmp_path):
    """tests/data/instruct.jsonl (Alpaca, prompt/response and chat records) through a real job: the
    eval is a perplexity on responses, and the two records made to overflow 48 tokens are reported
    (one long prompt, cut from the left; one long response, cut at its end)."""
    cfg = {"model": {"source": "gpt2", "size": "tiny", "max_length": 48},
           "data": {"source": "instruct", "path": "tests/data/instruct.jsonl", "eval_fraction": 0.25},
           "train": {"lr": 0.05, "batch_size": 4}, "schedule": {"rounds": 3, "tau1": 3, "tau2": 1},
           "runtime": {"progress": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    proc = mpirun(7, "run", "--config", str(tmp_path / "run.yaml"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    t = summary["truncated"]
    assert t["train"]["records"] + t["eval"]["records"] == 16
    assert t["train"]["prompt_truncated"] + t["eval"]["prompt_truncated"] == 1
    assert t["train"]["response_truncated"] + t["eval"]["response_truncated"] == 1
    cloud = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["tier"] == "cloud"]
    for r in cloud:
        assert r["eval_perplexity"] == pytest.approx(np.exp(r["eval_loss"])) and "eval_accuracy" not in r
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]
    assert summary["groups"] is None
    samples = (out / "samples.txt").read_text()  # greedy generations from the final model
    assert samples.count("### sample ") == 4 and samples.count("### Assistant:\nmodel:") == 4


LM = {"source": "fortunes", "task": "lm", "languages": ["en", "de", "zh"], "partition": "shelves", "eval_samples": 48}


def _lm_job(tmp_path, error_feedback: bool):
    """Causal LM on three languages' fortunes, clients by language (4 clients, 3 languages: de has
    two), a tiny GPT-2 fully fine-tuned, both uplinks top-k 5% (an aggressive, biased codec), with
    or without error feedback; the same seed either way."""
    cfg = {"model": {"source": "gpt2", "size": "tiny", "max_length": 32}, "peft": {"method": "none"}, "data": LM,
           "train": {"lr": 0.01, "batch_size": 8}, "schedule": {"rounds": ROUNDS, "tau1": 2, "tau2": 1},
           "compression": {"device_up": "topk:0.05", "edge_up": "topk:0.05", "error_feedback": error_feedback},
           "runtime": {"progress": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    proc = mpirun(7, "run", "--config", str(tmp_path / "run.yaml"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def lm_job(tmp_path_factory):
    return _lm_job(tmp_path_factory.mktemp("lm"), True)


def _eval_losses(out) -> list[float]:
    return [r["eval_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["tier"] == "cloud"]


def test_error_feedback_off_learns_less_under_top_k(lm_job, tmp_path):
    """The control run of error feedback on a workload that does not saturate (the LM loss falls
    from ~ln|V| all along): the same job with error_feedback off. Round 1 is the same in both (the
    residuals start at zero); from then on the run without feedback loses what top-k held back
    (the same large coordinates win every round), so its eval loss falls by measurably less.
    (The tiny GPT-2 does not learn the fortunes category task in a CI budget, and the topics task
    saturates near 0.99 accuracy with MiniLM: neither could tell a biased codec from a good one.)"""
    on, off = _eval_losses(lm_job), _eval_losses(_lm_job(tmp_path, False))
    assert len(on) == len(off) == ROUNDS + 1
    assert on[:2] == off[:2]  # rounds 0 and 1: nothing held back yet, bit for bit the same
    assert on[-1] < on[0]  # with feedback it learns
    assert on[0] - on[-1] > MARGIN * (off[0] - off[-1]), (on, off)  # ... and by clearly more than without



def test_multilingual_lm_job_reports_perplexity_per_language(lm_job):
    """The LM job (error feedback on): a perplexity per language whose token-weighted mean is the
    overall eval loss, and samples per language."""
    data, out = LM, lm_job
    from hierfed.config import ModelConfig
    from hierfed.model import load_tokenizer
    from hierfed.training import tokenize

    task = load_data(DataConfig(**data))
    tok = load_tokenizer(ModelConfig(source="gpt2"))
    targets = {g: int((tokenize(tok, [e for e in task.eval if e.group == g], "causal_lm", 32).labels[:, 1:] != -100).sum())
               for g in task.groups}  # next-token targets per language
    cloud = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["tier"] == "cloud"]
    for r in cloud:
        groups = r["groups"]
        assert list(groups) == ["en", "de", "zh"]
        for m in groups.values():
            assert m["eval_perplexity"] == pytest.approx(np.exp(m["eval_loss"]))
        weighted = sum(groups[g]["eval_loss"] * targets[g] for g in groups) / sum(targets.values())
        assert r["eval_loss"] == pytest.approx(weighted)
    samples = (out / "samples.txt").read_text()
    assert all(f"(group {g})" in samples for g in ("en", "de", "zh"))
