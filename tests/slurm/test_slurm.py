"""The scripts in slurm/ submitted to a real Slurm cluster, with their results checked.

CI (`.ci/run`) starts a test cluster on the machine first (`bash .ci/slurm.sh up`: 8 virtual nodes,
partitions debug, gpu and cpu). With CI set these tests fail when Slurm is not up; elsewhere they are
skipped without Slurm.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, job_env

TINY = ROOT / "launch" / "sweeps" / "tiny-run.yaml"


def _slurm_problem() -> str | None:
    if not shutil.which("sbatch"):
        return "sbatch is not installed"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    if r.returncode:
        return f"sinfo failed: {r.stderr.strip()}"
    if not any(s.startswith(("idle", "mix", "alloc")) for s in r.stdout.split()):
        return f"no node is up (sinfo states: {' '.join(r.stdout.split()) or 'none'})"
    return None


def in_ci() -> bool:
    """CI set to a true value (true, 1, yes): Slurm tests must run there, not skip. CI=false or
    CI=0 is a developer's machine."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


@pytest.fixture(scope="module", autouse=True)
def slurm() -> None:
    why = _slurm_problem()
    if why is None:
        return
    if in_ci():
        pytest.fail(f"CI is set but Slurm is not up ({why}); .ci/run starts it with `bash .ci/slurm.sh up`", pytrace=False)
    pytest.skip(f"Slurm is not up ({why}); `bash .ci/slurm.sh up` (as root) starts a test cluster here")


def env(**extra: str) -> dict[str, str]:
    e = job_env()
    e["PYTHON"] = sys.executable
    e.update(extra)
    return e


def run(cmd: list[str], timeout: float = 400, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=timeout)


def check_ok(proc, log: Path | None = None) -> None:
    more = f"\njob output:\n{log.read_text()[-3000:]}" if log and log.exists() else ""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}{more}"


def finished_run(out: Path, world_size: int) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == world_size and summary["rounds"] == 2
    return summary


def test_job_script_sizes_itself_and_runs(tmp_path: Path) -> None:
    """`bash slurm/job.sh` submits itself with --ntasks from the topology; srun starts the ranks."""
    log, out = tmp_path / "job.out", tmp_path / "run"
    proc = run(["bash", "slurm/job.sh", "--wait", f"--output={log}"], TOPOLOGY="default", CONFIG=str(TINY), OUT=str(out))
    check_ok(proc, log)
    text = log.read_text()
    assert "7 tasks" in text and "launching 7 ranks with srun" in text
    finished_run(out, 7)


def test_mismatched_allocation_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    log = tmp_path / "job.out"
    started = time.monotonic()
    proc = run(["sbatch", "--wait", "--ntasks=5", f"--output={log}", "slurm/job.sh"], timeout=120,
               TOPOLOGY="default", CONFIG=str(TINY), OUT=str(tmp_path / "never"))
    assert proc.returncode == 2, (proc.stdout, proc.stderr, log.read_text() if log.exists() else "")
    assert time.monotonic() - started < 60
    text = log.read_text()
    assert "slurm/job.sh: error: topology default needs 7 tasks (1 cloud + 2 edges × (1 + 2 devices) = 7 ranks" in text
    assert "SLURM_NTASKS=5" in text and "--ntasks=7" in text and "Traceback" not in text
    assert not (tmp_path / "never").exists()
    # the same check in `hierfed launch`, for jobs that call it directly (salloc, own scripts)
    proc = run(["salloc", "--ntasks=9", sys.executable, "-m", "hierfed", "launch", "--", "default"], timeout=120)
    assert proc.returncode == 2
    assert "needs 1 cloud + 2 edges × (1 + 2 devices) = 7 ranks, but the Slurm allocation has 9 tasks" in proc.stderr


def _partitions() -> set[str]:
    return {p.rstrip("*") for p in subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()}


def test_heterogeneous_job_puts_edges_on_gpu_nodes_and_devices_on_cpu_nodes(tmp_path: Path) -> None:
    if not {"gpu", "cpu"} <= _partitions():
        if in_ci():
            pytest.fail("the CI cluster lacks the gpu and cpu partitions of .ci/slurm.sh")
        pytest.skip("this Slurm has no 'gpu' and 'cpu' partitions")
    log, out = tmp_path / "het.out", tmp_path / "run"
    proc = run(["bash", "slurm/hetjob.sh", "--wait"], TOPOLOGY="default", CONFIG=str(TINY), OUT=str(out),
               JOB_OPTS=f"--job-name=hierfed-het --output={log}")
    check_ok(proc, log)
    text = log.read_text()
    comps = dict(re.findall(r"component (\d+): (\d+ tasks on \S+)", text))
    assert [comps[str(i)].split()[0] for i in range(5)] == ["1", "1", "2", "1", "2"]  # cloud, edge0, its devices, ...
    gpu_nodes = set(subprocess.run(["sinfo", "-h", "-p", "gpu", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split())
    for i in (0, 1, 3):  # cloud and edges on GPU nodes
        assert comps[str(i)].split()[-1] in gpu_nodes, comps
    for i in (2, 4):  # devices on CPU nodes
        assert comps[str(i)].split()[-1] not in gpu_nodes, comps
    assert "--het-group=0-4" in text
    finished_run(out, 7)


def test_sweep_array_runs_each_point_as_a_task_then_reports(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "slurm-smoke", "config": str(TINY), "grid": {"topology": ["default", "flat"]}}))
    out = tmp_path / "sweep"
    proc = run(["bash", "slurm/sweep.sh", "--wait", f"--output={tmp_path}/%x-%A_%a.out"], timeout=500,
               SPEC=str(spec), SWEEP_ARGS=f"--out {out}")
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
    check_ok(proc)
    assert "points 0,1, 7 tasks each" in proc.stdout, proc.stdout
    assert "srun" in logs and logs.count("finished in") == 2, logs
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted({r["topology"] for r in rows}) == ["default", "flat"] and len(rows) == 6
    assert (out / "summary.md").exists() and (out / "accuracy_vs_sim_time.png").exists()
    again = run(["bash", "slurm/sweep.sh"], timeout=120, SPEC=str(spec), SWEEP_ARGS=f"--out {out}")
    check_ok(again)
    assert "every point of" in again.stdout and "array job" not in again.stdout


@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_two_node_allocation_keeps_each_edge_on_one_node(launcher: str) -> None:
    """2 nodes of 7 slots: fanout-2x4's blocks (1 | 5 | 5) go 6 ranks + 5 ranks, not 7 + 4."""
    proc = run(["salloc", "--nodes=2", "--ntasks-per-node=7", sys.executable, "tests/slurm/probe.py", "fanout-2x4", launcher],
               timeout=120)
    check_ok(proc)
    nodes = dict(line.split() for line in proc.stdout.splitlines() if line[:1].isdigit())
    assert len(nodes) == 11
    first, second = {nodes[str(r)] for r in range(6)}, {nodes[str(r)] for r in range(6, 11)}
    assert len(first) == 1 and len(second) == 1 and first != second, nodes
