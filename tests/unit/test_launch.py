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
