"""A Channel is one parent-children communicator seen from one rank: the parent is rank 0 in it.

Tensors move as contiguous numpy buffers with mpi4py's upper-case (buffer) calls; only small
control messages are pickled. Every send is counted in the Ledger by the rank that sends it.
Waiting ranks either block inside MPI or poll a non-blocking request with a short backoff sleep,
which leaves the cores to computing ranks when ranks outnumber cores (see RuntimeConfig.wait).

MPI's counts and displacements are C ints: one collective moves at most 2^31 - 1 elements, and a
Gatherv's displacements must stay below that too. Buffers past the limit (a full fine-tuning of a
model over ~2.1 billion parameters, a gather of large payloads) therefore move in chunks, each a
collective of its own, posted together and matched in order on every rank; the result is the same
bytes. `HIERFED_COMM_CHUNK` lowers the limit (tests force tiny chunks with it).
"""

from __future__ import annotations

import os
import pickle
import time
from typing import Any, TypeVar

import numpy as np
from mpi4py import MPI

from hierfed.comm.ledger import Ledger

T = TypeVar("T")

_POLL_SPIN_S = 100e-6  # test in a tight loop this long first: short waits stay short
_POLL_FIRST_S = 20e-6
_POLL_MAX_S = 1e-3
_INT_MAX = (1 << 31) - 1


def chunk_limit() -> int:
    """Elements per collective (bytes for byte buffers): MPI's int limit, or HIERFED_COMM_CHUNK."""
    return max(1, min(_INT_MAX, int(os.environ.get("HIERFED_COMM_CHUNK", _INT_MAX))))


def _chunks(buf: np.ndarray) -> list[np.ndarray]:
    """Views of a contiguous buffer, each within the limit (the buffer itself when it fits)."""
    flat = buf.reshape(-1)
    limit = chunk_limit()
    if flat.size <= limit:
        return [buf]
    return [flat[i : i + limit] for i in range(0, flat.size, limit)]


def wait(request: MPI.Request, poll: bool) -> None:
    """Complete a non-blocking request; with poll=True test it in a short spin, then sleep between
    tests (doubling up to 1 ms) instead of spinning inside MPI."""
    if not poll:
        request.Wait()
        return
    spin_until = time.perf_counter() + _POLL_SPIN_S
    while time.perf_counter() < spin_until:
        if request.Test():
            return
    delay = _POLL_FIRST_S
    while not request.Test():
        time.sleep(delay)
        delay = min(delay * 2, _POLL_MAX_S)


def wait_any(requests: list[MPI.Request], poll: bool) -> int:
    """Index of a completed request among `requests` (the others keep running)."""
    if not poll:
        return MPI.Request.Waitany(requests)
    delay = _POLL_FIRST_S
    while True:
        index, done = MPI.Request.Testany(requests)
        if done and index != MPI.UNDEFINED:
            return index
        time.sleep(delay)
        delay = min(delay * 2, _POLL_MAX_S)


def wait_all(requests: list[MPI.Request], poll: bool) -> None:
    for r in requests:
        wait(r, poll)


def bcast_object(comm: MPI.Comm, obj: Any, root: bool, poll: bool) -> Any:
    """A pickled object from rank 0 of `comm` to the others (`root`: this rank is rank 0), waiting
    as runtime.wait says (mpi4py's lower-case bcast would spin inside MPI)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if root else b""
    size = np.array([len(data)], dtype=np.int64)
    wait(comm.Ibcast(size, root=0), poll)
    raw = bytearray(data) if root else bytearray(int(size[0]))
    wait(comm.Ibcast([raw, MPI.BYTE], root=0), poll)
    return obj if root else pickle.loads(raw)


class Channel:
    """Parent (rank 0 of `comm`) <-> children (the other ranks) over one communicator."""

    def __init__(self, comm: MPI.Comm, link: str, ledger: Ledger, poll: bool, is_parent: bool) -> None:
        self.comm = comm
        self.link = link  # "device-edge", "edge-cloud" or "device-cloud"
        self.ledger = ledger
        self.poll = poll
        self.is_parent = is_parent  # from the Role; the runtime's split keys make the parent rank 0 of comm
        self.num_children = comm.Get_size() - 1

    def _complete(self, request: MPI.Request) -> None:
        wait(request, self.poll)

    def bcast(self, buf: np.ndarray, receivers: int | None = None, raw: int | None = None) -> None:
        """Parent -> every child, in place. Counted at the parent once per receiver: `receivers`
        logical receivers (e.g. the sampled clients behind the children), default one per child."""
        if self.is_parent:
            n = self.num_children if receivers is None else receivers
            self.ledger.record(self.link, "down", buf.nbytes * n, raw=None if raw is None else raw * n)
        wait_all([self.comm.Ibcast(piece, root=0) for piece in _chunks(buf)], self.poll)

    def reduce_sum(self, buf: np.ndarray, senders: int = 1, raw: int | None = None) -> None:
        """Children -> parent: the parent's `buf` becomes the element-wise sum of the children's.

        The parent contributes nothing (its buf is zeroed first). Counted at each child, once per
        logical sender it stands for (a rank's virtual clients each send their own update); `raw`:
        one sender's uncompressed float32 size when `buf` is narrower (default: buf's own size).
        """
        if self.is_parent:
            buf[...] = 0
            wait_all([self.comm.Ireduce(MPI.IN_PLACE, piece, op=MPI.SUM, root=0) for piece in _chunks(buf)], self.poll)
        else:
            self.ledger.record(self.link, "up", buf.nbytes * senders, raw=None if raw is None else raw * senders)
            wait_all([self.comm.Ireduce(piece, None, op=MPI.SUM, root=0) for piece in _chunks(buf)], self.poll)

    def gather_bytes(self, payload: np.ndarray, raw: int = 0) -> list[np.ndarray] | None:
        """Children -> parent: variable-size uint8 payloads with one Gatherv (sizes gathered first).

        Counted at each child: the payload plus its 8-byte size; `raw` is its uncompressed size.
        Returns the children's payloads in child order at the parent, None at children.
        """
        if not self.is_parent:
            self.ledger.record(self.link, "up", payload.nbytes + 8, raw=raw)
        return gather_varying(self.comm, payload, self.is_parent, self.poll)

    def bcast_obj(self, obj: Any = None) -> Any:
        """A small control message from the parent to every child (pickled)."""
        if self.is_parent:
            size = len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
            self.ledger.record(self.link, "down", (size + 8) * self.num_children, kind="control")
        return bcast_object(self.comm, obj, self.is_parent, self.poll)

    def gather_obj(self, obj: Any) -> list[Any] | None:
        """Telemetry from every child to the parent (not counted: not training traffic).

        Returns the children's objects in child order at the parent, None at children.
        """
        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
        parts = gather_varying(self.comm, data, self.is_parent, self.poll)
        # numpy's stubs give ndarray the buffer protocol (__buffer__) only from Python 3.12
        return None if parts is None else [pickle.loads(p) for p in parts]  # type: ignore[arg-type]


def at_parent(parts: list[T] | None) -> list[T]:
    """A gather's result where it is read: at the parent, which always receives the list (the
    children get None and never read it)."""
    if parts is None:
        raise RuntimeError("a gather's result was read at a child rank; only the parent receives it")
    return parts


def gather_varying(comm: MPI.Comm, payload: np.ndarray, root: bool, poll: bool) -> list[np.ndarray] | None:
    """Variable-size uint8 payloads from the other ranks of `comm` to rank 0 (which sends none).

    Every rank learns every size (one Allgather of an int64), so all agree whether the payloads fit
    one Gatherv (total below the int limit: the usual case, received in place) or go in rounds of at
    most limit / size bytes per rank, each round's total within the limit."""
    sizes = np.zeros(comm.Get_size(), dtype=np.int64)
    wait(comm.Iallgather(np.array([0 if root else payload.size], dtype=np.int64), sizes), poll)
    limit = chunk_limit()
    if int(sizes.sum()) <= limit:
        if not root:
            wait(comm.Igatherv([payload, MPI.BYTE], None, root=0), poll)
            return None
        recv = np.empty(int(sizes.sum()), dtype=np.uint8)
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        wait(comm.Igatherv([payload[:0], MPI.BYTE], [recv, sizes, displs, MPI.BYTE], root=0), poll)
        return [recv[d : d + n] for d, n in zip(displs[1:], sizes[1:])]
    step = max(1, limit // comm.Get_size())
    out = [np.empty(int(n), dtype=np.uint8) for n in sizes] if root else []
    for start in range(0, int(sizes.max()), step):
        counts = np.clip(sizes - start, 0, step)
        if not root:
            mine = payload[start : start + int(counts[comm.Get_rank()])]
            wait(comm.Igatherv([mine, MPI.BYTE], None, root=0), poll)
            continue
        recv = np.empty(int(counts.sum()), dtype=np.uint8)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        wait(comm.Igatherv([payload[:0], MPI.BYTE], [recv, counts, displs, MPI.BYTE], root=0), poll)
        for r in range(1, comm.Get_size()):
            out[r][start : start + int(counts[r])] = recv[displs[r] : displs[r] + counts[r]]
    return out[1:] if root else None
