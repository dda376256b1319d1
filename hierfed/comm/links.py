"""Model traffic over one Channel, compressed per direction: what a parent and a child each hold.

Downlink (parent -> children): the parent's float64 parameters. Uncompressed, the float32 vector
is broadcast. With a codec, the first broadcast after start is the whole vector and later ones the
encoded difference from what the children already hold; both sides add the same decoded delta, so
they stay in step, and what the codec dropped is sent again next time.

Uplink (children -> parent): weighted updates (deltas). Uncompressed, contributions [w*delta, w]
are summed into one buffer and SUM-reduced (the fast path). With a codec, each sender (a client,
or an edge) encodes its own delta, with error feedback if configured, and every child's payloads
go to the parent in one Gatherv: per update [float64 weight][uint64 length][codec payload].
The parent decodes each and sums [w*delta, w] in float64.

Gathered (`gathered=True`: the parent's rule must see every update, hierfed.strategy.gathered): every
sender's update travels on its own as in the codec path, whatever the codec (the identity codec's
payload is the float32 vector behind a small header), and the parent decodes them into the rows of
an (n_senders, dim) array instead of summing (`receive_updates`). A sender is a (virtual) client of
a device rank, or an edge: a rank with many virtual clients sends them all, stacked in one message.
"""

from __future__ import annotations

import time

import numpy as np

from hierfed.comm.channel import Channel, at_parent
from hierfed.comm.codecs import Codec, CodecError, ErrorFeedback
from hierfed.strategy import Strategy

_META = np.dtype([("weight", "<f8"), ("length", "<u8")])


def _pack(parts: list[tuple[float, np.ndarray]]) -> np.ndarray:
    out = np.empty(sum(_META.itemsize + p.size for _, p in parts), dtype=np.uint8)
    pos = 0
    for weight, payload in parts:
        out[pos : pos + _META.itemsize] = np.array([(weight, payload.size)], dtype=_META).view(np.uint8)
        pos += _META.itemsize
        out[pos : pos + payload.size] = payload
        pos += payload.size
    return out


def _unpack(blob: np.ndarray) -> list[tuple[float, np.ndarray]]:
    parts, pos = [], 0
    while pos < blob.size:
        if blob.size - pos < _META.itemsize:
            raise CodecError(f"truncated update message: {blob.size - pos} bytes left, a header needs {_META.itemsize}")
        meta = blob[pos : pos + _META.itemsize].view(_META)[0]
        pos += _META.itemsize
        n = int(meta["length"])
        if n > blob.size - pos:
            raise CodecError(f"truncated update message: payload of {n} bytes, {blob.size - pos} left")
        parts.append((float(meta["weight"]), blob[pos : pos + n]))
        pos += n
    return parts


class _Scratch:
    """Full-size work buffers kept from round to round, one per (dtype, size, use): no fresh
    temporaries of the model's size on the aggregation path."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._bufs: dict[tuple[np.dtype, int, str], np.ndarray] = {}

    def get(self, dtype, size: int | None = None, use: str = "") -> np.ndarray:
        key = (np.dtype(dtype), self.dim if size is None else size, use)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = np.empty(key[1], dtype=key[0])
        return buf


class Parent:
    """The parent end of a tier: sends parameters down, receives summed updates."""

    def __init__(self, channel: Channel, down: Codec, up: Codec, dim: int, extra: int = 0, gathered: bool = False) -> None:
        self.channel, self.down, self.up, self.dim = channel, down, up, dim
        self.gathered = gathered  # the children send every update on its own (receive_updates)
        self.held: np.ndarray | None = None  # float32 parameters the children hold (codec downlink)
        self.decode_s = 0.0  # time spent decoding the last round's updates (part of aggregation)
        self._resync = False
        # one buffer for sends and reduced sums; `extra` values of a client algorithm follow [w*delta, w]
        self._buf32 = np.empty(dim + 1 + extra, dtype=np.float32)
        self._scratch = _Scratch(dim)  # codec paths: the downlink difference, the decoded sums

    def state_dict(self) -> dict[str, np.ndarray]:
        """What the children hold (codec downlinks): checkpointed so a resumed run continues exactly."""
        return {} if self.held is None else {"held": self.held.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if "held" in state and not self.down.is_identity:
            self.held = np.asarray(state["held"], dtype=np.float32).copy()
            self._resync = True

    def send(self, params: np.ndarray, receivers: int | None = None, rng: np.random.Generator | None = None) -> None:
        """The parameters to the children: the parent's float64 master copy, or float32 values equal
        to it (an edge's first round sends the vector it received, before it makes its master copy)."""
        if self._resync:  # resumed: first put the children back on the held copy, then carry on
            assert self.held is not None  # _resync is set only with held (load_state_dict)
            self.channel.bcast(self.held, receivers)
            self._resync = False
        if self.down.is_identity and params.dtype == np.float32 and params.flags.c_contiguous:
            self.channel.bcast(params, receivers)  # already what the children get (an edge's first round): no copy
            return
        if self.down.is_identity or self.held is None:
            buf = self._buf32
            np.copyto(buf[: self.dim], params, casting="same_kind")
            self.channel.bcast(buf[: self.dim], receivers)
            self.held = None if self.down.is_identity else buf[: self.dim].copy()
            return
        work = np.result_type(params, self.held, np.float64)  # float32 params: the difference their float64 master copy gives
        payload = self.down.encode(np.subtract(params, self.held, out=self._scratch.get(work), dtype=work), rng)
        self.channel.bcast(payload, receivers, raw=self.dim * 4)
        self.held += self.down.decode(payload, self.dim)

    def receive(self) -> np.ndarray:
        """[sum w*delta, sum w] over every update sent by the children this round (followed by the
        summed extra values of a client algorithm, uncompressed uplinks only)."""
        if self.up.is_identity:
            self.channel.reduce_sum(self._buf32)  # valid until the next send/receive
            return self._buf32
        total = self._scratch.get(np.float64, self.dim + 1, "total")  # valid until the next receive
        total[...] = 0
        blobs = at_parent(self.channel.gather_bytes(np.empty(0, dtype=np.uint8)))
        started = time.perf_counter()
        for blob in blobs:
            for weight, payload in _unpack(blob):
                decoded = self.up.decode(payload, self.dim)
                Strategy.accumulate(total, decoded, weight, self._scratch.get(Strategy.scratch_dtype(decoded, weight)))
        self.decode_s = time.perf_counter() - started
        return total

    def receive_updates(self) -> tuple[np.ndarray, np.ndarray]:
        """The gathered path: every update the children sent this round, decoded, as (updates (n, dim)
        float32, weights (n,) float64), children in rank order and each child's senders in its order.
        `updates` is valid until the next receive_updates."""
        blobs = at_parent(self.channel.gather_bytes(np.empty(0, dtype=np.uint8)))
        started = time.perf_counter()
        parts = [part for blob in blobs for part in _unpack(blob)]
        updates = self._scratch.get(np.float32, len(parts) * self.dim, "rows").reshape(len(parts), self.dim)
        for row, (_, payload) in zip(updates, parts):
            row[...] = self.up.decode(payload, self.dim)
        self.decode_s = time.perf_counter() - started
        return updates, np.array([w for w, _ in parts], dtype=np.float64)


class Child:
    """The child end of a tier: receives parameters, sends its senders' weighted updates."""

    def __init__(self, channel: Channel, down: Codec, up: Codec, dim: int, error_feedback: bool, resumed: bool = False,
                 extra: int = 0, gathered: bool = False) -> None:
        self.channel, self.down, self.up, self.dim, self.extra = channel, down, up, dim, extra
        self.summed = up.is_identity and not gathered  # the fast path: one SUM-reduced [sum w*delta, sum w, extras]
        self.held: np.ndarray | None = None
        self._resync = resumed and not down.is_identity  # a resumed parent first resends its held copy
        lossy = not (up.is_identity or up.spec in ("fp32",))
        self.feedback: dict[int, ErrorFeedback] | None = {} if (error_feedback and lossy) else None
        self._acc = np.zeros(dim + 1 + extra, dtype=np.float32)  # [w*delta, w, extras] (uncompressed)
        self._scratch = _Scratch(dim)  # weight * delta, for the uncompressed sum
        self._parts: list[tuple[float, np.ndarray]] = []
        self._senders = 0

    def receive(self, out: np.ndarray) -> None:
        """The parent's parameters into `out` (float32)."""
        if self._resync:
            self.held = np.empty(self.dim, dtype=np.float32)
            self.channel.bcast(self.held)
            self._resync = False
        if self.down.is_identity or self.held is None:
            self.channel.bcast(out)
            self.held = None if self.down.is_identity else out.copy()
            return
        payload = np.empty(self.down.encoded_size(self.dim), dtype=np.uint8)
        self.channel.bcast(payload)
        self.held += self.down.decode(payload, self.dim)
        out[:] = self.held

    def add(self, sender: int, weight: float, delta: np.ndarray, rng: np.random.Generator | None = None,
            extras: np.ndarray | None = None, base: np.ndarray | None = None) -> None:
        """Queue one sender's update (a client's, or an edge's) for this round's send. `extras`: a
        client algorithm's extra values (hierfed.strategy.client), summed as they are.

        `base`: the update is `delta - base` (an edge: its new master copy minus the parameters it
        received). Uncompressed, the difference is formed, scaled and summed block by block
        (`Strategy.accumulate_difference`); on the other paths it is written into `delta`."""
        self._senders += 1
        if self.summed:
            acc = self._acc if not self.extra else self._acc[: self.dim + 1]
            if base is not None:
                Strategy.accumulate_difference(acc, delta, base, weight)
            else:
                Strategy.accumulate(acc, delta, weight, self._scratch.get(Strategy.scratch_dtype(delta, weight)))
            if extras is not None:
                self._acc[self.dim + 1 :] += extras
            return
        if extras is not None:
            raise ValueError("extra values travel on uncompressed uplinks only (hierfed.cluster.preflight.check_client)")
        if base is not None:
            delta = np.subtract(delta, base, out=delta)
        if self.feedback is not None:
            ef = self.feedback.setdefault(sender, ErrorFeedback(self.up, self.dim))
            payload = ef.encode(delta, rng)
        else:
            payload = self.up.encode(delta, rng)
        self._parts.append((weight, payload))

    def send(self) -> float:
        """Send the queued updates to the parent; returns their total weight."""
        if self.summed:
            weight = float(self._acc[self.dim])
            self.channel.reduce_sum(self._acc, senders=self._senders)
            self._acc[:] = 0
        else:
            weight = sum(w for w, _ in self._parts)
            self.channel.gather_bytes(_pack(self._parts), raw=self._senders * (self.dim + 1) * 4)
            self._parts = []
        self._senders = 0
        return weight

    def state_dict(self) -> dict[str, np.ndarray]:
        """Error-feedback residuals, one per sender: state to checkpoint."""
        return {f"residual/{s}": ef.residual.copy() for s, ef in (self.feedback or {}).items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if self.feedback is None:
            return
        for key, value in state.items():
            sender = int(key.split("/", 1)[1])
            ef = self.feedback.setdefault(sender, ErrorFeedback(self.up, self.dim))
            ef.load_state_dict({"residual": value})
