"""hierfed.cluster.mpi: detecting an MPI launch, finding mpiexec and building its command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from hierfed.cluster import mpi as launch
from hierfed.errors import HierfedError

VENV_MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
MPI_FLAVOR = launch.mpi_flavor  # the lru_cached original (tests below may monkeypatch it away)


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch):
    for var in launch._MPI_ENV + ("HIERFED_MPIEXEC",):
        monkeypatch.delenv(var, raising=False)
    MPI_FLAVOR.cache_clear()
    yield
    MPI_FLAVOR.cache_clear()


def test_under_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not launch.under_mpi()
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"):
        monkeypatch.setenv(var, "0")
        assert launch.under_mpi()
        monkeypatch.delenv(var)
    assert not launch.under_mpi()


def test_venv_mpiexec_is_mpich() -> None:
    assert launch.mpi_flavor(VENV_MPIEXEC) == "mpich"


def test_mpich_command() -> None:
    cmd = launch.mpiexec_command(7, ["run", "default", "--rounds", "2"], mpiexec=VENV_MPIEXEC)
    assert cmd == [VENV_MPIEXEC, "-n", "7", sys.executable, "-m", "hierfed", "run", "default", "--rounds", "2"]


@pytest.mark.parametrize("euid, extra", [(0, ["--oversubscribe", "--allow-run-as-root"]), (1000, ["--oversubscribe"])])
def test_openmpi_command(monkeypatch: pytest.MonkeyPatch, euid: int, extra: list[str]) -> None:
    monkeypatch.setattr(launch, "mpi_flavor", lambda _: "openmpi")
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    cmd = launch.mpiexec_command(5, ["run"], mpiexec="/opt/ompi/bin/mpirun")
    assert cmd == ["/opt/ompi/bin/mpirun", "-n", "5", *extra, sys.executable, "-m", "hierfed", "run"]


def _fake_mpiexec(tmp_path: Path, banner: str) -> str:
    path = tmp_path / "mpirun"
    path.write_text(f"#!/bin/sh\necho '{banner}'\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("banner, flavor", [("mpirun (Open MPI) 4.1.5", "openmpi"), ("HYDRA build details:", "mpich"), ("something else", "unknown")])
def test_mpi_flavor_from_version_text(tmp_path: Path, banner: str, flavor: str) -> None:
    assert launch.mpi_flavor(_fake_mpiexec(tmp_path, banner)) == flavor


def test_mpi_flavor_of_missing_binary(tmp_path: Path) -> None:
    assert launch.mpi_flavor(str(tmp_path / "nope")) == "unknown"


def test_find_mpiexec_prefers_env_then_venv(monkeypatch: pytest.MonkeyPatch) -> None:
    assert launch.find_mpiexec() == VENV_MPIEXEC
    monkeypatch.setenv("HIERFED_MPIEXEC", "/site/bin/mpiexec")
    assert launch.find_mpiexec() == "/site/bin/mpiexec"


def test_find_mpiexec_falls_back_to_path_then_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "py").mkdir()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "py" / "python"))
    fake = _fake_mpiexec(tmp_path, "x")  # an 'mpirun' on PATH
    monkeypatch.setenv("PATH", str(tmp_path))
    assert launch.find_mpiexec() == fake
    monkeypatch.setenv("PATH", str(tmp_path / "py"))
    with pytest.raises(HierfedError, match="no mpiexec found"):
        launch.find_mpiexec()


def test_rank_env_defaults_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "4")
    env = launch.rank_env()
    assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "4"


def test_rank_env_picks_mpichs_tree_reduce_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ranks hierfed launches get MPICH's pipelined-tree MPI_Ireduce (BENCHMARKS.md,
    "Aggregation") — on this venv's MPICH wheel, read from the library itself; a value the user
    exported is kept; other MPIs and MPICH before 4 (no `tsp_tree`: MPI_Init would abort) get nothing."""
    monkeypatch.delenv("MPIR_CVAR_IREDUCE_INTRA_ALGORITHM", raising=False)
    assert launch.mpi_library().startswith("MPICH Version:")
    assert launch.rank_env()["MPIR_CVAR_IREDUCE_INTRA_ALGORITHM"] == "tsp_tree"
    monkeypatch.setenv("MPIR_CVAR_IREDUCE_INTRA_ALGORITHM", "auto")
    assert launch.rank_env()["MPIR_CVAR_IREDUCE_INTRA_ALGORITHM"] == "auto"
    assert launch.mpich_tuning("MPICH Version:      4.1.2") == {"MPIR_CVAR_IREDUCE_INTRA_ALGORITHM": "tsp_tree"}
    for other in ("MPICH Version:      3.4.3", "Open MPI v5.0.11, package: Open MPI", "Intel(R) MPI Library 2021.10",
                  "MVAPICH2 Version      :\t2.3.7", ""):
        assert launch.mpich_tuning(other) == {}


def test_the_first_rank_to_end_is_named_even_when_the_rest_end_right_after(tmp_path: Path) -> None:
    """Three stand-in ranks (sleeping processes of this host, listed like rank 0's table): the one
    killed first is named although the others are killed 50 ms later (mpiexec takes a few ms)."""
    import json
    import signal
    import socket
    import subprocess
    import time

    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)]
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        table = tmp_path / "ranks.json"
        watch = launch._FirstToEnd(table, job)
        table.write_text(json.dumps([{"rank": r, "role": f"role{r}", "host": socket.gethostname(), "pid": p.pid} for r, p in enumerate(procs)]))
        time.sleep(1.0)  # the watcher has read the table and waits on the pidfds
        procs[2].send_signal(signal.SIGKILL)
        time.sleep(0.05)  # mpiexec needs a few ms to notice and kill the rest (several process hops)
        for p in procs[:2]:
            p.send_signal(signal.SIGKILL)
        job.kill()
        first = watch.result()
        assert [(r["rank"], r["role"]) for r in first] == [(2, "role2")]
    finally:
        for p in [*procs, job]:
            p.kill()
            p.wait()
