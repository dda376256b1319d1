"""Failure handling: a failure on any rank prints one line naming the rank and its role, then
aborts the whole job, so no rank is left waiting in a collective; an error every rank found
identically (bad input) is printed once."""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable

from mpi4py import MPI

from hierfed.errors import HierfedError

# The rank that prints an error every rank found identically (bad input found before any message
# is exchanged). This is about not printing a message N times, not about roles.
REPORTING_RANK = 0

# How long a failing rank waits between printing its line and MPI_Abort. The launcher forwards a
# rank's stderr and handles its abort request on separate channels; an abort handled first kills
# the job before the line is forwarded (seen once in CI: rc 1, no error line; a known MPI launcher
# race, e.g. pmodels/mpich#518, flux-core#3894). Half a second lets the line drain first.
ABORT_GRACE_S = 0.5


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
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
        MPI.COMM_WORLD.Abort(getattr(e, "exit_code", 1))
