"""hierfed.placement.zero: where an edge group's torch.distributed rendezvous lives."""

from __future__ import annotations

import socket

import pytest
import torch
from mpi4py import MPI

from hierfed.errors import HierfedError
from hierfed.placement import zero


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch):
    """Two nodes, Debian style: each maps its own name to 127.0.1.1; the other's name resolves to
    its cluster address; the route to n2 leaves n1 from 10.0.0.1."""
    names = {"n1": "127.0.1.1", "n2": "10.0.0.2", "n1-ib": "192.168.0.1"}
    monkeypatch.setattr(socket, "gethostname", lambda: "n1")
    monkeypatch.setattr(socket, "gethostbyname", lambda name: names[name] if name in names else name)
    monkeypatch.setattr(zero, "_source_address", lambda ip: {"10.0.0.2": "10.0.0.1"}[ip])
    monkeypatch.delenv("HIERFED_MASTER_ADDR", raising=False)
    return names


def test_one_node_uses_the_loopback(cluster) -> None:
    assert zero.rendezvous_address(["n1", "n1"]) == "127.0.0.1"


def test_several_nodes_use_the_address_routed_to_a_member_not_the_loopback_name(cluster) -> None:
    """`gethostbyname(gethostname())` would give 127.0.1.1 here, which n2 cannot reach."""
    assert zero.rendezvous_address(["n1", "n2"]) == "10.0.0.1"


def test_override_with_the_host_name_pattern(cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIERFED_MASTER_ADDR", "{host}-ib")
    assert zero.rendezvous_address(["n1", "n2"]) == "192.168.0.1"
    monkeypatch.setenv("HIERFED_MASTER_ADDR", "10.9.9.9")
    assert zero.rendezvous_address(["n1", "n1"]) == "10.9.9.9"


def test_no_reachable_address_is_one_clear_error(cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    def unroutable(ip: str) -> str:
        raise OSError("Network is unreachable")

    monkeypatch.setattr(zero, "_source_address", unroutable)
    with pytest.raises(HierfedError, match=r"no address of n1 .*n2.* resolves to 127\.0\.1\.1; set HIERFED_MASTER_ADDR"):
        zero.rendezvous_address(["n1", "n2"])


def test_a_group_of_one_initialises_on_a_port_the_kernel_picked() -> None:
    """The real path on COMM_SELF: TCPStore on port 0, its actual port handed to the members (here
    none) and into MASTER_PORT; the gloo group works."""
    import os

    import torch.distributed as dist

    zero.init_group(MPI.COMM_SELF, True, "gloo", torch.device("cpu"))
    try:
        assert dist.get_world_size() == 1 and int(os.environ["MASTER_PORT"]) > 0 and os.environ["MASTER_ADDR"] == "127.0.0.1"
        t = torch.ones(3)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()
