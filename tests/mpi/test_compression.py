"""Compressed links end to end: accuracy against the uncompressed main job, bytes. (Exact resume with
every link compressed: tests/mpi/test_split_jobs.py, one job for all the state a resume carries.)"""

from __future__ import annotations

import json

import pytest

from conftest import mpirun
from test_jobs import check_ok, rows

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
