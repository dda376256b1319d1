"""Real sweeps and launches on this machine: the smoke sweep (2 fan-outs × 2 rounds) end to end,
a re-run that skips it, and the MPICH host file keeping each edge with its devices on one host."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, hierfed, job_env

pytestmark = pytest.mark.mpi

PNG = b"\x89PNG\r\n\x1a\n"


def check_ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def test_smoke_sweep_writes_results_and_a_rerun_skips(tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    proc = hierfed("sweep", "launch/sweeps/smoke.yaml", "--out", str(out), timeout=400)
    check_ok(proc)
    assert "[1/2] topology=fanout-1x8: finished" in proc.stdout and "[2/2] topology=fanout-2x4: finished" in proc.stdout

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["topology"], r["round"]) for r in rows] == [(t, str(n)) for t in ("fanout-1x8", "fanout-2x4") for n in range(3)]
    for r in rows:
        assert 0 <= float(r["eval_accuracy"]) <= 1
    by_point = {t: [r for r in rows if r["topology"] == t] for t in ("fanout-1x8", "fanout-2x4")}
    for t, rs in by_point.items():
        clock = [float(r["sim_clock_s"]) for r in rs]
        assert clock[0] == 0 < clock[1] < clock[2], (t, clock)
        # the smoke run learns: accuracy never falls and ends well above its start
        acc = [float(r["eval_accuracy"]) for r in rs]
        assert acc[0] <= acc[1] <= acc[2] and acc[2] >= acc[0] + 0.3, (t, acc)
        # the clock the cloud printed while it ran is the one the report recomputes from the rows
        live = [r["sim_clock_s"] for r in map(json.loads, (out / "points" / f"topology-{t}" / "metrics.jsonl").open()) if r["tier"] == "cloud"]
        assert live == pytest.approx(clock, rel=1e-9), (t, live, clock)
        # a round crosses the 50 ms WAN twice (down and up): the cloud link is on the critical path
        assert clock[2] - clock[1] > 0.1
        assert int(rs[1]["bytes_device_edge_up"]) > 0 and int(rs[1]["bytes_edge_cloud_up"]) > 0
    # the same 8 devices; 2 edges send twice the edge-cloud bytes of 1 edge
    one, two = (int(by_point[t][1]["bytes_edge_cloud_up"]) for t in ("fanout-1x8", "fanout-2x4"))
    assert two == 2 * one
    summary = (out / "summary.md").read_text()
    assert "2 of 2 points finished" in summary
    # one row per condition: its name, the number of seeds behind it, then the final accuracy
    assert "| topology=fanout-1x8 | 1 | " in summary and "| topology=fanout-2x4 | 1 | " in summary
    for name in ("accuracy_vs_round.png", "accuracy_vs_sim_time.png", "accuracy_vs_cloud_bytes.png", "bytes_per_tier.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    point = out / "points" / "topology-fanout-2x4"
    assert json.loads((point / "summary.json").read_text())["world_size"] == 11
    assert (point / "launch" / "ranks.tsv").exists() and (point / "run.yaml").exists()

    again = hierfed("sweep", "launch/sweeps/smoke.yaml", "--out", str(out), timeout=120)
    check_ok(again)
    assert again.stdout.count("done, skipped") == 2 and "finished in" not in again.stdout
    # The simulated clock models devices, not this host: the cloud's live clock is the report's
    # recomputation from the rows (above), and that ignores every measured second
    # (tests/unit/test_launch_simclock.py), so the same point run again gives the same times.
    assert hierfed("sweep", "launch/sweeps/smoke.yaml", "--out", str(out), "--print", "pending").stdout.strip() == ""
    # a changed setting makes the points stale: they would run again
    listed = hierfed("sweep", "launch/sweeps/smoke.yaml", "--out", str(out), "--set", "seed=1", "--list").stdout
    assert listed.count("stale") == 2


def test_mpich_hostfile_keeps_each_edge_on_one_host(tmp_path: Path) -> None:
    """Two names for this machine act as two hosts; MPICH's node ids show where each rank ran."""
    proc = subprocess.run([sys.executable, "tests/slurm/probe.py", "fanout-2x4", "mpiexec", "localhost:7,127.0.0.1:7"],
                          cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=120)
    check_ok(proc)
    nodes = dict(line.split() for line in proc.stdout.splitlines() if line[:1].isdigit())
    assert len(nodes) == 11
    # cloud + edge0 + its 4 devices on the first host; edge1 and its devices together on the second
    assert {nodes[str(r)] for r in range(6)} == {"node0"} and {nodes[str(r)] for r in range(6, 11)} == {"node6"}
