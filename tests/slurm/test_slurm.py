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


def finished_run(out: Path, world_size: int, rounds: int = 2) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == world_size and summary["rounds"] == rounds
    return summary


def _job_state(job: str) -> str:
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    m = re.search(r"JobState=(\w+)", text)
    return m.group(1) if m else "UNKNOWN"


def _wait_state(job: str, done: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while (state := _job_state(job)) not in done:
        assert time.monotonic() < deadline, f"job {job} still {state} after {timeout:.0f} s"
        time.sleep(1)
    return state


def _final_params(out: Path):
    import numpy as np

    latest = (out / "checkpoints" / "latest").read_text().strip()
    with np.load(out / "checkpoints" / latest / "state.npz") as z:
        return z["params"]


ROUNDS = "--rounds 4 --set schedule.tau1=10"  # the two jobs below: long enough that a rank can be killed mid-run


@pytest.fixture(scope="module")
def het_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """The heterogeneous job (slurm/hetjob.sh), run once: its own test's subject, and the
    uninterrupted run the requeued job must end equal to."""
    tmp = tmp_path_factory.mktemp("het")
    log, out = tmp / "het.out", tmp / "run"
    if not {"gpu", "cpu"} <= _partitions():  # a Slurm without .ci/slurm.sh's partitions: a plain job is the reference
        return run(["bash", "slurm/job.sh", "--wait", f"--output={log}"], TOPOLOGY="default", CONFIG=str(TINY), OUT=str(out), RUN_ARGS=ROUNDS), log, out
    proc = run(["bash", "slurm/hetjob.sh", "--wait"], TOPOLOGY="default", CONFIG=str(TINY), OUT=str(out), RUN_ARGS=ROUNDS,
               JOB_OPTS=f"--job-name=hierfed-het --output={log}")
    return proc, log, out


def test_job_script_sizes_itself_and_a_killed_requeued_job_equals_an_uninterrupted_one(tmp_path: Path, het_run) -> None:
    """`bash slurm/job.sh` submits itself with --ntasks from the topology; srun starts the ranks. A
    device rank SIGKILLed mid-run fails the job; `scontrol requeue` (what Slurm does itself when a
    node is lost; the job asks for --requeue) runs it again under the same job id and OUT, and
    `--resume auto` continues from the last complete checkpoint: the finished job equals the
    uninterrupted heterogeneous job of the same topology and config, bit for bit. (On the same node:
    the killed step's MPICH shared-memory segment is still there, which slurm/job.sh steps around.)"""
    import signal

    log, out = tmp_path / "job.out", tmp_path / "run"
    proc = run(["bash", "slurm/job.sh", "--parsable", f"--output={log}", "--open-mode=append"],
               TOPOLOGY="default", CONFIG=str(TINY), OUT=str(out), RUN_ARGS=ROUNDS)
    check_ok(proc)
    job = proc.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "latest").exists():  # a complete checkpoint to come back to (round 1's)
            state = _job_state(job)
            assert state in {"PENDING", "CONFIGURING", "RUNNING"} and time.monotonic() < deadline, (state, log.read_text() if log.exists() else "")
            time.sleep(0.5)
        victim = next(r for r in json.loads((out / "ranks.json").read_text()) if r["role"] == "edge1/d0")
        os.kill(int(victim["pid"]), signal.SIGKILL)
        assert _wait_state(job, {"FAILED", "COMPLETED", "CANCELLED", "NODE_FAIL"}, 120) == "FAILED"
        assert (out / "checkpoints" / "latest").read_text().strip() != "round-0004"  # it did not finish
        check_ok(run(["scontrol", "requeue", job], timeout=60))
        # Slurm holds a requeued job ~2 min; start it in a few seconds instead, not at once: slurmd
        # revoked the killed run's job credential, to the second, and a run started within that second
        # gets a credential it takes for revoked ("Killing non-startable batch job": FAILED again).
        check_ok(run(["scontrol", "update", f"jobid={job}", "StartTime=now+3"], timeout=60))
        _wait_state(job, {"PENDING", "CONFIGURING", "RUNNING", "COMPLETED"}, 60)  # requeued: no longer the old FAILED
        assert _wait_state(job, {"FAILED", "COMPLETED", "CANCELLED"}, 300) == "COMPLETED", log.read_text()[-3000:]
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = log.read_text()
    assert text.count("7 tasks") >= 2 and text.count("launching 7 ranks with srun") == 2, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 7 and summary["rounds"] == 4
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines() if json.loads(line)["tier"] == "cloud"] == [0, 1, 2, 3, 4]
    het_proc, het_log, het_out = het_run
    check_ok(het_proc, het_log)
    import numpy as np

    np.testing.assert_array_equal(_final_params(out), _final_params(het_out))


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


def test_heterogeneous_job_puts_edges_on_gpu_nodes_and_devices_on_cpu_nodes(request: pytest.FixtureRequest) -> None:
    if not {"gpu", "cpu"} <= _partitions():
        if in_ci():
            pytest.fail("the CI cluster lacks the gpu and cpu partitions of .ci/slurm.sh")
        pytest.skip("this Slurm has no 'gpu' and 'cpu' partitions")
    proc, log, out = request.getfixturevalue("het_run")
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
    finished_run(out, 7, rounds=4)


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
