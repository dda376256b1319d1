"""The Channel's collectives past MPI's int counts: forced into tiny chunks, the same bytes."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from conftest import ROOT, job_env
from hierfed.cluster.mpi import mpiexec_command

pytestmark = pytest.mark.mpi


def test_chunked_collectives_move_the_same_bytes() -> None:
    """bcast, reduce_sum, gather_bytes, gather_obj and the links' gathered path (every sender's update
    a row at the parent, weights in order, plain and fp16-coded) on 4 ranks with the limit at 7 and 64 elements
    (a 1003-value vector: 144 and 16 chunks; payloads of 0-111 bytes: several Gatherv rounds) give
    bit-identical results to the unchunked collectives."""
    cmd = mpiexec_command(4, [])
    cmd = cmd[: cmd.index("-m")] + ["tests/mpi/chunked_channel.py"]
    proc = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    whole = seen["whole"]
    assert whole["payloads"] == seen["expected_payloads"]
    assert [o[0] for o in whole["objs"]] == [1, 2, 3] and whole["objs"][2][1] == [3] * 150
    assert whole["pieces"] == 1 and seen["7"]["pieces"] == 144 and seen["64"]["pieces"] == 16  # it did chunk
    for chunk in ("7", "64"):
        assert seen[chunk]["bcast_everywhere"] == 1
        assert seen[chunk]["gathered_rows"] == {"identity": True, "fp16": True}
        assert np.array_equal(np.array(seen[chunk]["sum"], dtype=np.float32), np.array(whole["sum"], dtype=np.float32))
        assert seen[chunk]["payloads"] == whole["payloads"] and seen[chunk]["objs"] == whole["objs"]
    assert whole["bcast_everywhere"] == 1
    assert whole["gathered_rows"] == {"identity": True, "fp16": True}
