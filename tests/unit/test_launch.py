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


MPICH_DEATH = """
===================================================================================
=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES
=   PID 22092 RUNNING AT vm
=   EXIT CODE: 9
=   CLEANING UP REMAINING PROCESSES
=   YOU CAN IGNORE THE BELOW CLEANUP MESSAGES
===================================================================================
YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)
"""
OPENMPI_DEATH = "mpiexec noticed that process rank 4 with PID 22092 on node vm exited on signal 9 (Killed).\n"
RANKS = [{"rank": 0, "role": "cloud", "host": "vm", "pid": 22000}, {"rank": 4, "role": "edge1/d0", "host": "vm", "pid": 22092}]


def test_dead_ranks_named_from_mpich_pid_report() -> None:
    """MPICH (Hydra) reports a pid and host; the rank table turns them into a rank and role."""
    assert launch.dead_ranks(MPICH_DEATH, RANKS) == [
        "rank 4 (edge1/d0, pid 22092 on node vm) ended: Killed (signal 9); the launcher ended the other ranks"]
    other_host = [dict(r, host="n2") for r in RANKS]  # pids are per host: a pid on another node is not rank 4
    assert launch.dead_ranks(MPICH_DEATH, other_host) == [
        "the process with pid 22092 on node vm ended: Killed (signal 9); the launcher ended the other ranks"]
    plain_exit = MPICH_DEATH.replace("EXIT CODE: 9", "EXIT CODE: 3").split("YOUR APPLICATION TERMINATED")[0]
    assert launch.dead_ranks(plain_exit, RANKS) == ["rank 4 (edge1/d0, pid 22092 on node vm) ended: exit code 3; the launcher ended the other ranks"]


def test_dead_ranks_named_from_openmpi_report_and_silence_otherwise() -> None:
    assert launch.dead_ranks(OPENMPI_DEATH, RANKS) == [
        "rank 4 (edge1/d0, pid 22092 on node vm) ended: killed by signal 9; the launcher ended the other ranks"]
    assert launch.dead_ranks("hierfed: error: data.path: x is not a file\n", RANKS) == []
