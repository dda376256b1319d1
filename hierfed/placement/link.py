"""The split-learning protocol between a weak device and its edge (see docs/split.md).

Per local step the device cuts its batch into M micro-batches (torch.chunk) and, for each, runs
the embeddings and blocks [0, k) and sends the boundary activations with the attention mask and
labels to its edge (Isend). Pipelined (the default), it forwards the next micro-batch while the
previous ones are on the edge, then finishes backward as the gradients come back (GPipe-style:
gradients accumulate over the M micro-batches, one optimiser step per local step, so the result is
that of whole-model training on the same batch). Stop-and-wait mode sends one micro-batch and waits
for its gradient before the next (the benchmark's baseline).

The edge serves all its split devices at once: for each step it keeps one receive posted per
device, processes whichever device's micro-batch arrives first (blocks [k, L), head, loss,
backward), and returns the boundary gradient and the loss. Each split device is one client that
trains the whole model, its upper half on the edge (SplitFedV1, docs/split.md): the edge keeps one
copy of the upper stage's trainable values and one optimiser per device for the edge round, steps
each copy on its own device's gradients (summed in micro-batch order), and the edge adds the
copies' updates weighted by the devices' samples, as FedAvg weights every client. With
train.max_grad_norm both sides clip by the client's global gradient norm: they exchange their
squared partial norms (8 bytes each way, counted as `clip_norm`) before each step (a DeepSpeed edge,
which trains one stage shared by its devices, answers with the squared norm of the whole step
instead: `shared_squared_norm`, hierfed/placement/zero.py). Optimiser state
is fresh every edge round (as every client's), or kept across rounds (`split.optimizer_state:
persistent`, checkpointed on both sides). Message sizes are agreed once at start-up (a handshake).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import torch

from hierfed.comm.channel import wait, wait_all, wait_any
from hierfed.comm.codecs import Codec, parse_codec
from hierfed.comm.ledger import Ledger
from hierfed.errors import HierfedError
from hierfed.model import FlatView
from hierfed.model.cut import DeviceStage, EdgeStage
from hierfed.seeding import derive_seed
from hierfed.training import Tokenized, load_optimizer_arrays, make_optimizer, optimizer_arrays

TAG_ACT, TAG_META, TAG_GRAD, TAG_LOSS, TAG_NORM = 11, 12, 13, 14, 15
LINK = "device-edge"
_CASTS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TensorWire:
    """How a tensor crosses the cut. fp32/fp16/bf16 are casts: the tensor is cast where it lives
    (on the GPU, before the copy) and its raw bytes travel. int8 goes through the checked,
    stochastic codec of hierfed.comm.codecs (block scales, unbiased rounding)."""

    def __init__(self, name: str) -> None:
        self.cast = _CASTS.get(name)
        self.codec: Codec | None = None if self.cast else parse_codec(name)

    def _codec(self) -> Codec:
        assert self.codec is not None  # every wire that is not a cast has its codec (__init__)
        return self.codec

    def nbytes(self, numel: int) -> int:
        return numel * self.cast.itemsize if self.cast else self._codec().encoded_size(numel)

    def encode(self, t: torch.Tensor, seed: int) -> np.ndarray:
        if self.cast:
            return t.detach().to(self.cast).contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        return self._codec().encode(t.detach().reshape(-1).to("cpu", torch.float32).numpy(), np.random.default_rng(seed))

    def decode(self, buf: np.ndarray, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
        if self.cast:
            return torch.from_numpy(buf).view(self.cast).view(shape).to(device, dtype)
        n = int(np.prod(shape))
        return torch.from_numpy(self._codec().decode(buf, n)).view(shape).to(device, dtype)


class Phases:
    """Seconds spent in each named phase of one side of the cut, accumulated until taken.

    Lap timing: `mark(name)` charges the time since the previous mark to `name`. On a GPU, work is
    asynchronous and lands in whichever phase waits for it (the activation's copy to the host
    waits for the forward) unless `sync` is set (runtime.profile): then every mark synchronises the
    GPU first, so each phase holds its own work, at the cost of the overlap the phases had."""

    def __init__(self, device: torch.device, sync: bool) -> None:
        self._sync = functools.partial(torch.cuda.synchronize, device) if sync and device.type == "cuda" else None
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def start(self) -> None:
        if self._sync:
            self._sync()
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        if self._sync:
            self._sync()
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


@dataclass(frozen=True)
class Shapes:
    """One split device's micro-batch shapes, sent to its edge once (the handshake)."""

    seq_len: int
    hidden: int
    micro: tuple[int, ...]  # micro-batch sizes (torch.chunk of the batch)
    causal: bool  # labels per token (causal LM) or per example

    def meta_len(self, b: int) -> int:
        return b * self.seq_len + (b * self.seq_len if self.causal else b)

    def share(self, i: int) -> float:
        """Micro-batch i's weight in the step's mean loss."""
        return self.micro[i] / sum(self.micro)


def global_index(whole: FlatView, part: FlatView) -> np.ndarray:
    """Positions in the whole model's flat vector of a pruned model's trainable parameters (each
    must be in the whole model's layout, with the same shape)."""
    where = {n: (a, b, tuple(p.shape)) for (n, p), a, b in zip(whole.params, whole.offsets[:-1], whole.offsets[1:])}
    for n, p in part.params:
        if n not in where or where[n][2] != tuple(p.shape):
            got = "is missing" if n not in where else f"has shape {list(where[n][2])}"
            raise HierfedError(f"split placement: trainable parameter {n} {list(p.shape)}: the whole model's layout {got}")
    return np.concatenate([np.arange(*where[n][:2]) for n, _ in part.params]).astype(np.int64)


def flat_grads(flat: FlatView) -> torch.Tensor:
    """The trainable parameters' gradients as one float32 vector, where they live (GPU or CPU)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for _, p in flat.params])


def _flat_values(flat: FlatView) -> torch.Tensor:
    """The trainable parameters' values as one float32 vector, where they live (a copy)."""
    return torch.cat([p.detach().reshape(-1).float() for _, p in flat.params])


def _set_values(flat: FlatView, vec: torch.Tensor) -> None:
    with torch.no_grad():
        for (_, p), a, b in zip(flat.params, flat.offsets[:-1], flat.offsets[1:]):
            p.copy_(vec[a:b].view_as(p))


def set_grads(flat: FlatView, vec: torch.Tensor) -> None:
    for (_, p), a, b in zip(flat.params, flat.offsets[:-1], flat.offsets[1:]):
        p.grad = vec[a:b].view_as(p).to(p.dtype)


def squared_norm(flat: FlatView) -> float:
    """The squared L2 norm of the trainable parameters' gradients, in float64: this side's partial
    of the client's global norm."""
    return float(sum(float(p.grad.detach().double().pow(2).sum()) for _, p in flat.params if p.grad is not None))


def clip_coefficient(squared_parts: tuple[float, float], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor for the norm sqrt(device part + edge part): both sides
    compute it from the same two numbers in the same order, so they scale by the same factor."""
    total = (squared_parts[0] + squared_parts[1]) ** 0.5
    return min(1.0, max_norm / (total + 1e-6))


def shared_squared_norm(stage: float, devices: dict[int, float], shares: dict[int, float]) -> float:
    """The squared norm a DeepSpeed edge clips one step by (docs/split.md, DeepSpeed edges): the
    shared upper stage's squared gradient norm plus its devices' squared partial norms weighted by
    their shares of the samples (shares sum to 1), i.e. sum_d share_d (|g_d|^2 + |G|^2): the
    sample-weighted mean over the devices of the squared global norm of what the step applies for
    each (its own blocks' gradient and the shared stage's). One device: its global norm across the cut.
    Summed in device order, so every rank of the group gets the same number."""
    return stage + sum(shares[d] * devices[d] for d in sorted(devices))


def scale_grads(flat: FlatView, coef: float) -> None:
    if coef < 1.0:
        with torch.no_grad():
            for _, p in flat.params:
                if p.grad is not None:
                    p.grad.mul_(coef)


def exchange_norm(comm, peer: int, mine: float, ledger: Ledger, direction: str, poll: bool) -> tuple[list, np.ndarray, np.ndarray]:
    """Post the exchange of squared partial norms with `peer` (complete with wait_all on the requests)."""
    out, got = np.array([mine], dtype=np.float64), np.zeros(1, dtype=np.float64)
    ledger.record(LINK, direction, out.nbytes, kind="clip_norm")
    return [comm.Irecv(got, source=peer, tag=TAG_NORM), comm.Isend(out, dest=peer, tag=TAG_NORM)], out, got


def _step(flat: FlatView, opt: torch.optim.Optimizer) -> None:
    opt.step()
    opt.zero_grad(set_to_none=True)


class SplitClient:
    """Device side: the embeddings and blocks [0, k) of a device-pruned model."""

    def __init__(self, comm, server: int, model, k: int, cfg, ledger: Ledger, poll: bool, shared_stage: bool = False) -> None:
        self.comm, self.server, self.cfg, self.ledger, self.poll = comm, server, cfg, ledger, poll
        # True: the edge is a DeepSpeed group training one upper stage for all its split devices; it
        # answers this device's squared partial norm with the squared norm the whole step is clipped by
        self.shared_stage = shared_stage
        self.stage = DeviceStage(model, k)
        self.flat = FlatView(model)
        self.device = next(model.parameters()).device
        self.act, self.grad = TensorWire(cfg.split.activation_codec), TensorWire(cfg.split.gradient_codec)
        self.pipeline = cfg.split.pipeline
        self.phases = Phases(self.device, cfg.runtime.profile)
        self.opt: torch.optim.Optimizer | None = None  # kept across rounds only with split.optimizer_state: persistent

    def optimizer(self) -> torch.optim.Optimizer:
        """This round's optimiser: a fresh one (as every client's), or the persistent one."""
        if self.opt is None or self.cfg.split.optimizer_state == "fresh":
            self.opt = make_optimizer([p for _, p in self.flat.params], self.cfg.train)
        return self.opt

    def state_dict(self) -> dict[str, np.ndarray]:
        """The persistent optimiser's state (empty when it is fresh every round)."""
        return optimizer_arrays(self.opt) if self.opt is not None and self.cfg.split.optimizer_state == "persistent" else {}

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        if arrays:
            load_optimizer_arrays(self.optimizer(), arrays)

    def handshake(self, data: Tokenized, causal: bool) -> Shapes:
        bs = min(self.cfg.train.batch_size, len(data))
        micro = tuple(len(c) for c in torch.arange(bs).chunk(self.cfg.split.micro_batches))
        shapes = Shapes(int(data.input_ids.shape[1]), self.stage.config.hidden_size, micro, causal)
        self.comm.send(shapes, dest=self.server, tag=TAG_META)
        self.ledger.record(LINK, "up", 64, kind="control")
        return shapes

    def train(self, data: Tokenized, steps: int, seed: int) -> tuple[float, int]:
        """`steps` optimiser steps over the cut; returns (mean loss, samples seen), as LocalTrainer."""
        rng = np.random.default_rng(seed)  # the same batches as whole-model training
        opt = self.optimizer()
        bs = min(self.cfg.train.batch_size, len(data))
        self.stage.train()
        total = 0.0
        self.phases.start()
        for j in range(steps):
            batch = data.batch(rng.choice(len(data), size=bs, replace=False), self.device)
            chunks = list(zip(*(batch[k].chunk(self.cfg.split.micro_batches) for k in ("input_ids", "attention_mask", "labels"))))
            inflight, results = [], []
            for i, (ids, mask, labels) in enumerate(chunks):
                torch.manual_seed(derive_seed(seed, j, i, 0))  # dropout, independent of arrival order
                h = self.stage(ids, mask)
                self.phases.mark("compute")
                inflight.append((h, self._send(h, mask, labels, derive_seed(seed, j, i, 2))))
                if not self.pipeline:  # stop-and-wait: this micro-batch's gradient before the next
                    results.append(self._finish(*inflight.pop()))
            results += [self._finish(h, msg) for h, msg in inflight]
            self._clip()
            _step(self.flat, opt)
            self.phases.mark("step")
            total += sum(results)
        return total / steps, steps * bs

    def _clip(self) -> None:
        """Clip by the global gradient norm across the cut: this side's squared norm for the edge's
        (or, from a DeepSpeed edge, for the squared norm of the whole shared step)."""
        max_norm = self.cfg.train.max_grad_norm
        if max_norm is None:
            return
        mine = squared_norm(self.flat)
        requests, _out, got = exchange_norm(self.comm, self.server, mine, self.ledger, "up", self.poll)
        wait_all(requests, self.poll)
        self.phases.mark("wait_gradient")
        parts = (float(got[0]), 0.0) if self.shared_stage else (mine, float(got[0]))
        scale_grads(self.flat, clip_coefficient(parts, max_norm))

    def _send(self, h: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple:
        """Send a micro-batch across the cut and post the receives of its gradient and loss."""
        payload = self.act.encode(h, seed)
        meta = np.concatenate([mask.reshape(-1).cpu().numpy(), labels.reshape(-1).cpu().numpy()]).astype(np.int64)
        self.phases.mark("encode")
        self.ledger.record(LINK, "up", payload.nbytes + meta.nbytes, kind="activation", raw=h.numel() * 4 + meta.nbytes)
        grad = np.empty(self.grad.nbytes(h.numel()), dtype=np.uint8)
        loss = np.zeros(1, dtype=np.float64)
        to = self.server
        requests = [self.comm.Irecv(grad, source=to, tag=TAG_GRAD), self.comm.Irecv(loss, source=to, tag=TAG_LOSS)]
        # The edge posted receives for the whole step, so these complete as soon as the bytes are
        # copied; completing them now (not at the end) lets large messages move while this rank
        # computes its next micro-batch (a rendezvous transfer needs the sender inside MPI).
        wait_all([self.comm.Isend(payload, dest=to, tag=TAG_ACT), self.comm.Isend(meta, dest=to, tag=TAG_META)], self.poll)
        self.phases.mark("wait_send")
        return requests, (payload, meta), grad, loss

    def _finish(self, h: torch.Tensor, msg: tuple) -> float:
        """Wait for this micro-batch's boundary gradient and weighted loss; finish its backward."""
        requests, _buffers, grad, loss = msg
        wait_all(requests, self.poll)
        self.phases.mark("wait_gradient")
        g = self.grad.decode(grad, tuple(h.shape), h.device, h.dtype)
        self.phases.mark("decode")
        h.backward(g)
        self.phases.mark("compute")
        return float(loss[0])


class SplitServer:
    """Edge side: blocks [k, L), the head and the loss of an edge-pruned model, for all split devices."""

    def __init__(self, comm, model, kind: str, k: int, cfg, ledger: Ledger, poll: bool) -> None:
        self.comm, self.cfg, self.ledger, self.poll = comm, cfg, ledger, poll
        self.stage = EdgeStage(model, kind, k)
        self.flat = FlatView(model)
        self.act, self.grad = TensorWire(cfg.split.activation_codec), TensorWire(cfg.split.gradient_codec)
        self.shapes: dict[int, Shapes] = {}
        first = next(model.parameters())  # activations arrive in the frozen weights' dtype
        self.device, self.dtype = first.device, next((p.dtype for p in model.parameters() if not p.requires_grad), first.dtype)
        self.phases = Phases(self.device, cfg.runtime.profile)
        self.opt = None

    def handshake(self, devices: list[int]) -> None:
        for d in devices:  # d: the device's rank in the split communicator
            self.shapes[d] = self.comm.recv(source=d, tag=TAG_META)

    def make_optimizer(self) -> None:
        """Per device, one optimiser over the upper stage's parameters (each keeps its own state):
        made at the start of each round (fresh) or once and kept (persistent, checkpointed)."""
        self.opts: dict[int, torch.optim.Optimizer] = {}
        self.copies: dict[int, torch.Tensor] = {}  # device -> its copy of the trainable upper values
        self.loaded: int | None = None  # the device whose copy is in the model now

    def _optimizer(self, d: int) -> torch.optim.Optimizer:
        if d not in self.opts:
            self.opts[d] = make_optimizer([p for _, p in self.flat.params], self.cfg.train)
        return self.opts[d]

    def load(self, vec: np.ndarray) -> None:
        """The edge's upper parameters at the start of an edge round: every device's copy starts here."""
        self.flat.set(vec)
        self.start = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32)).to(self.device)
        self.copies, self.loaded = {}, None
        if self.cfg.split.optimizer_state == "fresh":
            self.opts = {}

    def save_state(self, out, round_: int) -> dict[str, np.ndarray]:
        """The devices' persistent optimiser states (by device rank), for this rank's checkpoint file;
        nothing when optimiser state is fresh every round."""
        if self.cfg.split.optimizer_state == "fresh":
            return {}
        return {f"{d}/{k}": v for d, opt in sorted(self.opts.items()) for k, v in optimizer_arrays(opt).items()}

    def load_state(self, out, round_: int, arrays: dict[str, np.ndarray]) -> None:
        for d in sorted({int(k.split("/", 1)[0]) for k in arrays}):
            load_optimizer_arrays(self._optimizer(d), {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{d}/")})

    def _use(self, d: int) -> None:
        """Device d's copy of the upper values into the model (its forward and backward need it)."""
        if self.loaded == d:
            return
        if self.loaded is not None:
            self.copies[self.loaded] = _flat_values(self.flat)
        _set_values(self.flat, self.copies.get(d, self.start))
        self.loaded = d

    def update(self, weights: dict[int, float]) -> np.ndarray:
        """The served devices' upper updates weighted by their samples, sum_d w_d (x_d - x0), in float64."""
        if self.loaded is not None:
            self.copies[self.loaded] = _flat_values(self.flat)
        out = np.zeros(self.flat.dim, dtype=np.float64)
        start = self.start.cpu().numpy().astype(np.float64)
        for d in sorted(self.copies):
            out += weights[d] * (self.copies[d].cpu().numpy().astype(np.float64) - start)
        return out

    def serve(self, devices: dict[int, int], steps: int, shares: dict[int, float]) -> None:
        """Train each device's copy of the upper stage for `steps` steps on that device's
        micro-batches (`devices`: {rank: seed}; `shares` is used by the shared-stage DeepSpeed edge).

        Per step and device: the micro-batch gradients summed in micro-batch order (whatever the
        arrival order), clipped by the client's global norm (the squared partials exchanged with
        the device), one step of the device's optimiser on the device's copy.
        """
        self.stage.train()
        max_norm = self.cfg.train.max_grad_norm
        self.phases.start()
        for j in range(steps):
            acc = {d: torch.zeros(self.flat.dim, dtype=torch.float32, device=self.device) for d in devices}
            seen = {d: 0 for d in devices}
            norms = {}
            for d, i, wire, mask, labels in self.arrivals(devices, j):
                self._use(d)
                loss = self.forward_backward(wire, mask, labels, self.shapes[d].share(i))
                acc[d] += flat_grads(self.flat)
                for _, p in self.flat.params:
                    p.grad = None
                self.phases.mark("compute")
                self.reply(d, wire, loss, derive_seed(devices[d], j, i, 3))
                seen[d] += 1
                if max_norm is not None and seen[d] == len(self.shapes[d].micro):  # the device's partial is on its way
                    mine = float(acc[d].double().pow(2).sum())
                    norms[d] = (mine, *exchange_norm(self.comm, d, mine, self.ledger, "down", self.poll))
            for d in sorted(devices):
                g = acc[d]
                if max_norm is not None:
                    mine, requests, _out, got = norms[d]
                    wait_all(requests, self.poll)
                    g = g * clip_coefficient((float(got[0]), mine), max_norm)
                self._use(d)
                set_grads(self.flat, g)
                _step(self.flat, self._optimizer(d))
            self.phases.mark("step")

    def forward_backward(self, wire: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, share: float, scale: float = 1.0) -> float:
        """Upper stage forward and backward of one micro-batch; returns its loss weighted by its share."""
        loss, _ = self.stage(wire, mask, labels)
        # The whole batch's mean loss is the micro-batches' losses weighted by their share of it.
        (loss * share * scale).backward()
        return float(loss.detach()) * share

    def arrivals(self, devices: dict[int, int], j: int):
        """(device, micro-batch index, wire, mask, labels) of step j in arrival order. Receives for
        all of the step's micro-batches are posted up front (devices never wait for a buffer); MPI
        matches a device's messages in order, and its micro-batches are taken in that order."""
        posted = {d: [self._post(d, i) for i in range(len(self.shapes[d].micro))] for d in devices}
        nxt = {d: 0 for d in devices}
        while any(nxt[d] < len(posted[d]) for d in devices):
            keys = [d for d in devices if nxt[d] < len(posted[d])]
            d = keys[wait_any([posted[x][nxt[x]][0] for x in keys], self.poll)]
            i = nxt[d]
            _, meta_req, payload, meta = posted[d][i]
            wait(meta_req, self.poll)
            self.phases.mark("wait_activation")
            nxt[d] = i + 1
            torch.manual_seed(derive_seed(devices[d], j, i, 1))  # dropout, independent of arrival order
            unpacked = self._unpack(d, i, payload, meta)
            self.phases.mark("decode")
            yield (d, i, *unpacked)

    def _post(self, d: int, i: int):
        s = self.shapes[d]
        b = s.micro[i]
        payload = np.empty(self.act.nbytes(b * s.seq_len * s.hidden), dtype=np.uint8)
        meta = np.empty(s.meta_len(b), dtype=np.int64)
        return self.comm.Irecv(payload, source=d, tag=TAG_ACT), self.comm.Irecv(meta, source=d, tag=TAG_META), payload, meta

    def _unpack(self, d: int, i: int, payload: np.ndarray, meta: np.ndarray):
        s = self.shapes[d]
        b, t, dev = s.micro[i], s.seq_len, self.device
        wire = self.act.decode(payload, (b, t, s.hidden), dev, self.dtype).requires_grad_()
        mask = torch.from_numpy(meta[: b * t].copy()).view(b, t).to(dev)
        labels = torch.from_numpy(meta[b * t :].copy())
        return wire, mask, (labels.view(b, t) if s.causal else labels).to(dev)

    def reply(self, d: int, wire: torch.Tensor, loss: float, seed: int, scale: float = 1.0) -> None:
        """Send a micro-batch's boundary gradient (of a loss that was multiplied by `scale`) and its
        loss back; the device posted the receives."""
        if wire.grad is None:
            raise RuntimeError("split placement: no gradient reached the cut (reply before the edge's backward)")
        grad = self.grad.encode(wire.grad if scale == 1.0 else wire.grad / scale, seed)
        out = np.array([loss], dtype=np.float64)
        self.phases.mark("encode")
        self.ledger.record(LINK, "down", grad.nbytes + out.nbytes, kind="gradient", raw=wire.grad.numel() * 4 + out.nbytes)
        wait_all([self.comm.Isend(grad, dest=d, tag=TAG_GRAD), self.comm.Isend(out, dest=d, tag=TAG_LOSS)], self.poll)
        self.phases.mark("wait_send")
