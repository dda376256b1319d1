"""hierfed.cluster: host lists, rank-to-host maps for every shipped topology, host files,
launcher command lines, and the Slurm allocation check (pure: nothing is started)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from hierfed.cluster import jobs, mpi, slurm
from hierfed.cluster.hosts import Host, blocks, hostfile_text, map_ranks, parse_hosts, read_hostfile, runs
from hierfed.errors import HierfedError
from hierfed.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "topologies").glob("*.yaml"))
VENV_MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch: pytest.MonkeyPatch):
    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(var)
    for var in mpi._MPI_ENV + ("HIERFED_MPIEXEC",):
        monkeypatch.delenv(var, raising=False)


# ------------------------------------------------------------------------------ hosts ---


def test_parse_hosts() -> None:
    assert parse_hosts("a:8,b:4") == [Host("a", 8), Host("b", 4)]
    assert parse_hosts("a,a,b") == [Host("a", 2), Host("b", 1)]  # repeats add up, order kept
    for bad in ("a:0", "a:x", ":4", ""):
        with pytest.raises(HierfedError):
            parse_hosts(bad)


def test_read_hostfile_in_every_form(tmp_path: Path) -> None:
    f = tmp_path / "hosts"
    f.write_text("# cluster\nn1:4\nn2 slots=6   # Open MPI form\nn3\nn3\n\n")
    assert read_hostfile(f) == [Host("n1", 4), Host("n2", 6), Host("n3", 2)]
    with pytest.raises(HierfedError, match="cannot read host file"):
        read_hostfile(tmp_path / "missing")


@pytest.mark.parametrize("text, names", [
    ("hf1", ["hf1"]),
    ("hf[1-3]", ["hf1", "hf2", "hf3"]),
    ("gpu[01-02,07],cpu1", ["gpu01", "gpu02", "gpu07", "cpu1"]),
    ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
])
def test_expand_nodelist(text: str, names: list[str]) -> None:
    assert slurm.expand_nodelist(text) == names


def test_slurm_hosts_and_tasks() -> None:
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "hf[1-3],x", "SLURM_TASKS_PER_NODE": "4(x3),2", "SLURM_NTASKS": "14"}
    assert slurm.slurm_hosts(env) == [Host("hf1", 4), Host("hf2", 4), Host("hf3", 4), Host("x", 2)]
    assert slurm.slurm_tasks(env) == [14]
    het = {"SLURM_JOB_ID": "1", "SLURM_HET_SIZE": "3", "SLURM_NTASKS_HET_GROUP_0": "1",
           "SLURM_NTASKS_HET_GROUP_1": "1", "SLURM_NTASKS_HET_GROUP_2": "4"}
    assert slurm.slurm_tasks(het) == [1, 1, 4]


# -------------------------------------------------------------- every shipped topology ---


def _slots_for(p) -> list[Host]:
    """Two hosts, each big enough for the cloud plus the largest edge block."""
    biggest = max(len(r) for _, r in blocks(p))
    return [Host("n1", biggest + 1), Host("n2", p.world_size)]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_world_size_and_edge_map_of_shipped_topology(path: Path) -> None:
    p = load_topology(path).placement()
    cmd = jobs.cluster_command(p.world_size, ["run", str(path)], "mpiexec", mpiexec=VENV_MPIEXEC)
    assert cmd[:3] == [VENV_MPIEXEC, "-n", str(p.world_size)] and cmd[3:7] == [sys.executable, "-m", "mpi4py", "-m"]
    hostmap = map_ranks(p, _slots_for(p), "edge")
    assert len(hostmap) == p.world_size
    # each edge with all its devices on one host; each host a contiguous range of ranks
    for e in p.edges:
        assert len({hostmap[r] for r in (*e.ranks, *e.device_ranks)}) == 1, e.name
    hosts_in_order = [h for h, _ in runs(hostmap)]
    assert len(hosts_in_order) == len(set(hosts_in_order))
    # the host file says the same thing in MPICH, Open MPI and srun form
    assert hostfile_text(hostmap, "srun").split() == hostmap
    mpich = [line.split(":") for line in hostfile_text(hostmap, "mpich").split()]
    assert sum(int(n) for _, n in mpich) == p.world_size
    assert slurm.het_sizes(p)[0] == 1 and sum(slurm.het_sizes(p)) == p.world_size


def test_edge_map_never_splits_an_edge_but_block_does() -> None:
    p = load_topology(ROOT / "topologies" / "fanout-2x4.yaml").placement()  # blocks 1 | 5 | 5
    hosts = [Host("a", 7), Host("b", 7)]
    assert map_ranks(p, hosts, "edge") == ["a"] * 6 + ["b"] * 5
    assert map_ranks(p, hosts, "block") == ["a"] * 7 + ["b"] * 4  # edge1 (ranks 6-10) straddles


def test_map_errors_name_the_problem() -> None:
    p = load_topology(ROOT / "topologies" / "fanout-2x4.yaml").placement()
    with pytest.raises(HierfedError, match="needs 11 ranks but the hosts have 8 slots"):
        map_ranks(p, [Host("a", 4), Host("b", 4)])
    with pytest.raises(HierfedError, match=r"cannot keep edge1 \(5 ranks, 6-10\) on one host.*--map block"):
        map_ranks(p, [Host("a", 4), Host("b", 8)])


def test_het_sizes_follow_rank_order() -> None:
    assert slurm.het_sizes(load_topology(ROOT / "topologies" / "default.yaml").placement()) == [1, 1, 2, 1, 2]
    assert slurm.het_sizes(load_topology(ROOT / "topologies" / "zero-edges.yaml").placement()) == [1, 2, 2, 2, 2]
    assert slurm.het_sizes(load_topology(ROOT / "topologies" / "flat-8.yaml").placement()) == [1, 8]


# ---------------------------------------------------------------------- command lines ---


def test_mpich_command_with_hostfile() -> None:
    cmd = jobs.cluster_command(7, ["run"], "mpiexec", "/tmp/hf", mpiexec=VENV_MPIEXEC)
    assert cmd == [VENV_MPIEXEC, "-n", "7", "-f", "/tmp/hf", sys.executable, "-m", "mpi4py", "-m", "hierfed", "run"]


@pytest.mark.parametrize("euid, root", [(0, ["--allow-run-as-root"]), (1000, [])])
def test_openmpi_command_with_hostfile(monkeypatch: pytest.MonkeyPatch, euid: int, root: list[str]) -> None:
    monkeypatch.setattr(jobs, "mpi_flavor", lambda _: "openmpi")
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    cmd = jobs.cluster_command(5, ["run"], "mpiexec", "/tmp/hf", mpiexec="/opt/ompi/bin/mpirun")
    assert cmd[:3 + 1 + len(root)] == ["/opt/ompi/bin/mpirun", "-n", "5", "--oversubscribe", *root]
    assert cmd[4 + len(root):8 + len(root)] == ["--hostfile", "/tmp/hf", "--map-by", "slot"]


def test_srun_commands() -> None:
    cmd = jobs.cluster_command(7, ["run"], "srun", "/tmp/hf")
    assert cmd[:5] == ["srun", "--mpi=pmi2", "--kill-on-bad-exit=1", "--ntasks=7", "--distribution=arbitrary"]
    het = jobs.cluster_command(7, ["run"], "srun", het_groups=5)
    assert "--het-group=0-4" in het and not any(c.startswith("--ntasks") for c in het)


def test_plan_job_writes_map_and_sets_slurm_hostfile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    p = load_topology(ROOT / "topologies" / "fanout-2x4.yaml").placement()
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "hf[1-2]", "SLURM_TASKS_PER_NODE": "7(x2)", "SLURM_NTASKS": "14"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(jobs.shutil, "which", lambda name: "/usr/bin/srun")
    job = jobs.plan_job(p, ["run"], tmp_path, "auto")
    assert job.launcher == "srun" and job.env["SLURM_HOSTFILE"] == str(tmp_path / "hostfile")
    assert job.files["hostfile"].split() == ["hf1"] * 6 + ["hf2"] * 5
    assert "6\tedge\tedge1\thf2" in job.files["ranks.tsv"]
    assert "ranks on hosts: hf1 0-5, hf2 6-10" in job.describe()


# ------------------------------------------------------------------ allocation checks ---


def test_allocation_check(monkeypatch: pytest.MonkeyPatch) -> None:
    p = load_topology(ROOT / "topologies" / "default.yaml").placement()
    one = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "hf1", "SLURM_TASKS_PER_NODE": "7", "SLURM_NTASKS": "7"}
    slurm.check_allocation(p, one)
    with pytest.raises(HierfedError) as e:
        slurm.check_allocation(p, one | {"SLURM_NTASKS": "5", "SLURM_TASKS_PER_NODE": "5"})
    assert "needs 1 cloud + 2 edges × (1 + 2 devices) = 7 ranks" in str(e.value) and "has 5 tasks" in str(e.value)
    assert "--ntasks=7" in str(e.value)
    with pytest.raises(HierfedError, match="has 9 tasks"):  # too many on one node: sized wrongly
        slurm.check_allocation(p, one | {"SLURM_NTASKS": "9", "SLURM_TASKS_PER_NODE": "9"})
    slurm.check_allocation(p, one | {"SLURM_NTASKS": "9", "SLURM_TASKS_PER_NODE": "9"}, exact=False)  # a sweep point
    two = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "hf[1-2]", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NTASKS": "8"}
    slurm.check_allocation(p, two)  # slack across nodes is fine (edges kept whole)
    het = {"SLURM_JOB_ID": "1", "SLURM_HET_SIZE": "2", "SLURM_NTASKS_HET_GROUP_0": "3", "SLURM_NTASKS_HET_GROUP_1": "4"}
    with pytest.raises(HierfedError, match="components of 1 : 1 : 2 : 1 : 2 tasks.*has 2 components of 3 : 4"):
        slurm.check_allocation(p, het)


def test_srun_outside_slurm_is_refused(tmp_path: Path) -> None:
    p = load_topology(ROOT / "topologies" / "default.yaml").placement()
    with pytest.raises(HierfedError, match="needs a Slurm allocation"):
        jobs.plan_job(p, ["run"], tmp_path, "srun")


# ---------------------------------------------------------------------------- the CLI ---


def test_launch_dry_run_prints_command_and_map(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from hierfed.cli import main

    monkeypatch.chdir(ROOT)
    assert main(["launch", "--dry-run", "--hosts", "a:6,b:6", "--", "fanout-2x4", "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "launching 11 ranks with mpiexec (ranks on hosts: a 0-5, b 6-10)" in out
    assert f"-f {tmp_path / 'x' / 'launch' / 'hostfile'}" in out and "a:6\nb:5\n" in out
    assert main(["launch", "--print", "het-sizes", "--", "uneven"]) == 0
    assert main(["launch", "--print", "world", "--", "fanout-8x1"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == ["1 1 3 1 1", "17"]


def test_mpirun_wrapper_dry_run(tmp_path: Path) -> None:
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(HOSTFILE="launch/hosts.example", DRY_RUN="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", "launch/mpirun.sh", "fanout-4x2", "--out", str(tmp_path / "r")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "launching 13 ranks with mpiexec (ranks on hosts: node1 0-6, node2 7-12)" in proc.stdout
    assert "node1:7\nnode2:6\n" in proc.stdout and not (tmp_path / "r").exists()
