"""Compressed links end to end: accuracy against the uncompressed main job, bytes, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import mpirun
from test_jobs import _tiny_config, check_ok, final_params, rows

pytestmark = pytest.mark.mpi


def summary(out):
    return json.loads((out / "summary.json").read_text())


def test_int8_uplinks_match_uncompressed_accuracy(default_run, tmp_path):
    """int8 on both uplinks: within 1 point of the uncompressed main job (same seeds), ~4x fewer uplink bytes."""
    base_out, base_proc = default_run
    check_ok(base_proc)
    out = tmp_path / "int8"
    check_ok(mpirun(7, "run", "topologies/default.yaml", "--out", str(out),
                    "--set", "compression.device_up=int8", "--set", "compression.edge_up=int8"))
    base, s = summary(base_out), summary(out)
    assert s["final"]["eval_accuracy"] >= base["final"]["eval_accuracy"] - 0.01
    for link in ("device-edge", "edge-cloud"):
        up, raw = s["bytes"][link]["up"], s["bytes_uncompressed"][link]["up"]
        assert raw == base["bytes"][link]["up"]  # the same run, uncompressed
        assert 0.24 < up / raw < 0.30  # 1 byte per value + 8 bytes of scale per 256, + headers
    assert s["cloud_link_reduction"] > 900


def test_topk_int8_with_error_feedback_still_learns(tmp_path):
    """top-k 10% + int8 with error feedback on both uplinks: loss falls and accuracy clears 0.7.

    The floor: chance is 0.25 and the uncompressed job reaches ~0.99 in these rounds; a sparsified
    update that lost its residuals (or scrambled indices) stays far below 0.7.
    """
    out = tmp_path / "topk"
    check_ok(mpirun(7, "run", "topologies/default.yaml", "--out", str(out),
                    "--set", "compression.device_up=topk:0.1 > int8", "--set", "compression.edge_up=topk:0.1 > int8"))
    s = summary(out)
    cloud = [r for r in rows(out) if r["tier"] == "cloud" and r["round"] > 0]
    assert cloud[-1]["loss"] < cloud[0]["loss"]
    assert s["final"]["eval_accuracy"] >= 0.7
    assert s["bytes"]["edge-cloud"]["up"] < 0.2 * s["bytes_uncompressed"]["edge-cloud"]["up"]


def test_resume_with_compressed_links_is_exact(tmp_path):
    """Error-feedback residuals and the downlinks' held copies are checkpointed: resume == uninterrupted."""
    cfg = _tiny_config(tmp_path, schedule={"rounds": 3, "tau1": 2, "tau2": 2},
                       compression={"device_up": "topk:0.2 > int8", "edge_up": "int8", "edge_down": "fp16", "cloud_down": "int4"})
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    check_ok(mpirun(7, "run", "--config", cfg, "--out", str(whole)))
    check_ok(mpirun(7, "run", "--config", cfg, "--out", str(parts), "--rounds", "2"))
    check_ok(mpirun(7, "run", "--config", cfg, "--out", str(parts), "--resume"))
    np.testing.assert_array_equal(final_params(parts), final_params(whole))
    assert (parts / "checkpoints" / "ranks" / "round-0002" / "rank-00002.npz").exists()
