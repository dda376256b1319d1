"""Failure handling: a failure on any rank prints one line naming the rank and its role, then
aborts the whole job, so no rank is left waiting in a collective; an error every rank found
identically (bad input) is printed once."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from mpi4py import MPI

from hierfed.errors import HierfedError

# The rank that prints an error every rank found identically (bad input found before any message
# is exchanged). This is about not printing a message N times, not about roles.
REPORTING_RANK = 0


def report_once(message: str) -> None:
    """Print an error every rank found identically, from one rank only."""
    if MPI.COMM_WORLD.Get_rank() == REPORTING_RANK:
        print(f"hierfed: error: {message}", file=sys.stderr, flush=True)


def guarded(role_name: str, body: Callable[[], None]) -> None:
    """Run a rank's work; on any exception print one line and abort every rank of the job."""
    try:
        body()
    except BaseException as e:  # noqa: BLE001 - every failure must end the whole job
        rank = MPI.COMM_WORLD.Get_rank()
        if isinstance(e, HierfedError):
            line = str(e)
        elif isinstance(e, KeyboardInterrupt):
            line = "interrupted"
        else:
            line = f"{type(e).__name__}: {e}".splitlines()[0]
        print(f"hierfed: error: rank {rank} ({role_name}): {line}", file=sys.stderr, flush=True)
        if os.environ.get("HIERFED_DEBUG"):
            traceback.print_exc()
        MPI.COMM_WORLD.Abort(getattr(e, "exit_code", 1))
