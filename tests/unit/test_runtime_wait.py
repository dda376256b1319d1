"""How ranks wait for messages: runtime.wait resolved from the node's ranks, threads and cores."""

from __future__ import annotations

import pytest

from hierfed.runtime.world import choose_wait


@pytest.mark.parametrize(
    "ranks, cores, threads, poll",
    [
        (7, 2, 1, True),  # this machine's default job: ranks outnumber cores, waiting ranks must sleep
        (4, 16, 1, False),  # a GPU node: every rank has a core, spin inside MPI
        (16, 16, 1, False),  # exactly one core per rank
        (8, 16, 4, True),  # threads count: 32 busy threads on 16 cores
        (1, 1, 1, False),
    ],
)
def test_auto_blocks_only_when_ranks_fit_the_cores(ranks: int, cores: int, threads: int, poll: bool) -> None:
    chosen, why = choose_wait("auto", ranks, cores, threads)
    assert chosen is poll
    assert why.startswith("poll" if poll else "block") and f"{ranks} ranks" in why and f"{cores} cores" in why


@pytest.mark.parametrize("mode", ["poll", "block"])
def test_explicit_mode_wins(mode: str) -> None:
    # block on an oversubscribed node, poll on a roomy one: the user's choice is kept and reported
    for ranks, cores in ((7, 2), (2, 64)):
        chosen, why = choose_wait(mode, ranks, cores, 1)
        assert chosen is (mode == "poll") and why.startswith(f"{mode} (set")


def test_cpu_quota_of_a_container(tmp_path) -> None:
    from hierfed.runtime.world import cpu_quota

    assert cpu_quota(str(tmp_path)) is None  # no cgroup files: unlimited
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(str(tmp_path)) is None
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # docker --cpus 2.5
    assert cpu_quota(str(tmp_path)) == 3
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1, 1 CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(str(tmp_path)) == 1
