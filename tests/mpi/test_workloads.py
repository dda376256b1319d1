"""Real MPI jobs on the fortunes workloads (Debian's packages, .ci/run installs them): the shelves
partition across the default topology's 4 clients and the cloud's per-group evaluation in
metrics.jsonl and summary.json; instruction data; the multilingual LM job's per-language metrics
(the job: tests/conftest.py; it is also the codecs' workload, tests/mpi/test_compression.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from conftest import LM_DATA, mpirun
from hierfed.data import DataConfig, load_data

pytestmark = pytest.mark.mpi

DATA = {"source": "fortunes", "task": "category", "categories": 4, "shelf": 2, "partition": "shelves", "eval_samples": 64}


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


def test_multilingual_lm_job_reports_perplexity_per_language(lm_job):
    """The multilingual LM job (tests/conftest.py), uncompressed: a perplexity per language whose
    token-weighted mean is the overall eval loss, and samples per language."""
    data, out = LM_DATA, lm_job({})
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
