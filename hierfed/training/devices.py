"""Where a rank computes: its torch device (a GPU per node-local rank) and its thread count."""

from __future__ import annotations

import os

import torch

from hierfed.errors import HierfedError


def torch_device(name: str) -> torch.device:
    """"cpu", or a GPU for "cuda"/"auto": the rank's node-local index modulo the GPUs it sees."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise HierfedError("runtime.device=cuda, but torch sees no GPU on this node")
    return torch.device("cuda", local_rank() % torch.cuda.device_count())


def local_rank() -> int:
    """This process's index among the ranks on its node, as the MPI launcher (or Slurm) says."""
    names = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK")
    return next((int(os.environ[v]) for v in names if v in os.environ), 0)


def configure_threads(threads: int) -> None:
    """Torch threads per rank: ranks usually outnumber cores, so one each by default."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (or parallel work has started): keep it
        pass
