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
backward), and returns the boundary gradient and the loss. Its upper adapter is shared: gradients
of all devices' micro-batches are summed per device in micro-batch order, then averaged over the
devices in device order (so the result does not depend on arrival order) before one optimiser step
per local step. Message sizes are agreed once at start-up (a handshake of shapes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from hierfed.comm.channel import wait, wait_all, wait_any
from hierfed.comm.codecs import Codec, parse_codec
from hierfed.comm.ledger import Ledger
from hierfed.engine import Tokenized, derive_seed, load_optimizer_arrays, make_optimizer, optimizer_arrays
from hierfed.model import FlatView
from hierfed.split import DeviceStage, EdgeStage

TAG_ACT, TAG_META, TAG_GRAD, TAG_LOSS = 11, 12, 13, 14
LINK = "device-edge"
_CODECS = {"fp32": "identity"}


def tensor_codec(name: str) -> Codec:
    return parse_codec(_CODECS.get(name, name))


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
    """Positions in the whole model's flat vector of a pruned model's trainable parameters."""
    where = {n: (a, b) for (n, _), a, b in zip(whole.params, whole.offsets[:-1], whole.offsets[1:])}
    return np.concatenate([np.arange(*where[n]) for n, _ in part.params]).astype(np.int64)


def flat_grads(flat: FlatView) -> np.ndarray:
    out = np.zeros(flat.dim, dtype=np.float64)
    for (_, p), a, b in zip(flat.params, flat.offsets[:-1], flat.offsets[1:]):
        if p.grad is not None:
            out[a:b] = p.grad.reshape(-1).to("cpu", torch.float32).numpy()
    return out


def set_grads(flat: FlatView, vec: np.ndarray) -> None:
    src = torch.from_numpy(vec.astype(np.float32))
    for (_, p), a, b in zip(flat.params, flat.offsets[:-1], flat.offsets[1:]):
        p.grad = src[a:b].view_as(p).to(p.device, p.dtype)


def _step(flat: FlatView, opt: torch.optim.Optimizer, max_grad_norm: float | None) -> None:
    trainable = [p for _, p in flat.params]
    if max_grad_norm is not None:  # each side clips its own gradients (documented in docs/split.md)
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)


class SplitClient:
    """Device side: the embeddings and blocks [0, k) of a device-pruned model."""

    def __init__(self, comm, server: int, model, k: int, cfg, ledger: Ledger, poll: bool) -> None:
        self.comm, self.server, self.cfg, self.ledger, self.poll = comm, server, cfg, ledger, poll
        self.stage = DeviceStage(model, k)
        self.flat = FlatView(model)
        self.act, self.grad = tensor_codec(cfg.split.activation_codec), tensor_codec(cfg.split.gradient_codec)
        self.pipeline = cfg.split.pipeline

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
        opt = make_optimizer([p for _, p in self.flat.params], self.cfg.train)
        bs = min(self.cfg.train.batch_size, len(data))
        self.stage.train()
        total = 0.0
        for j in range(steps):
            batch = data.batch(rng.choice(len(data), size=bs, replace=False))
            chunks = list(zip(*(batch[k].chunk(self.cfg.split.micro_batches) for k in ("input_ids", "attention_mask", "labels"))))
            inflight, results = [], []
            for i, (ids, mask, labels) in enumerate(chunks):
                torch.manual_seed(derive_seed(seed, j, i, 0))  # dropout, independent of arrival order
                h = self.stage(ids, mask)
                inflight.append((h, self._send(h, mask, labels, derive_seed(seed, j, i, 2))))
                if not self.pipeline:  # stop-and-wait: this micro-batch's gradient before the next
                    results.append(self._finish(*inflight.pop()))
            results += [self._finish(h, msg) for h, msg in inflight]
            _step(self.flat, opt, self.cfg.train.max_grad_norm)
            total += sum(results)
        return total / steps, steps * bs

    def _send(self, h: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple:
        """Send a micro-batch across the cut and post the receives of its gradient and loss."""
        x = h.detach().reshape(-1).to("cpu", torch.float32).numpy()
        payload = self.act.encode(x, np.random.default_rng(seed))
        meta = np.concatenate([mask.reshape(-1).cpu().numpy(), labels.reshape(-1).cpu().numpy()]).astype(np.int64)
        self.ledger.record(LINK, "up", payload.nbytes + meta.nbytes, kind="activation", raw=x.nbytes + meta.nbytes)
        grad = np.empty(self.grad.encoded_size(h.numel()), dtype=np.uint8)
        loss = np.zeros(1, dtype=np.float64)
        to = self.server
        requests = [self.comm.Isend(payload, dest=to, tag=TAG_ACT), self.comm.Isend(meta, dest=to, tag=TAG_META),
                    self.comm.Irecv(grad, source=to, tag=TAG_GRAD), self.comm.Irecv(loss, source=to, tag=TAG_LOSS)]
        return requests, (payload, meta), grad, loss

    def _finish(self, h: torch.Tensor, msg: tuple) -> float:
        """Wait for this micro-batch's boundary gradient and weighted loss; finish its backward."""
        requests, _buffers, grad, loss = msg
        wait_all(requests, self.poll)
        h.backward(torch.from_numpy(self.grad.decode(grad, h.numel())).view_as(h).to(h.device, h.dtype))
        return float(loss[0])


class SplitServer:
    """Edge side: blocks [k, L), the head and the loss of an edge-pruned model, for all split devices."""

    def __init__(self, comm, model, kind: str, k: int, cfg, ledger: Ledger, poll: bool) -> None:
        self.comm, self.cfg, self.ledger, self.poll = comm, cfg, ledger, poll
        self.stage = EdgeStage(model, kind, k)
        self.flat = FlatView(model)
        self.act, self.grad = tensor_codec(cfg.split.activation_codec), tensor_codec(cfg.split.gradient_codec)
        self.shapes: dict[int, Shapes] = {}
        first = next(model.parameters())  # activations arrive in the frozen weights' dtype
        self.device, self.dtype = first.device, next((p.dtype for p in model.parameters() if not p.requires_grad), first.dtype)
        self.busy_s = 0.0  # time spent computing (the rest of serve() is waiting for micro-batches)
        self._sends: list = []
        self.opt = None

    def handshake(self, devices: list[int]) -> None:
        for d in devices:  # d: the device's rank in the split communicator
            self.shapes[d] = self.comm.recv(source=d, tag=TAG_META)

    def make_optimizer(self) -> None:
        """The edge's optimiser persists across rounds (it is edge state, checkpointed with the rank)."""
        self.opt = make_optimizer([p for _, p in self.flat.params], self.cfg.train)

    def load(self, vec: np.ndarray) -> None:
        self.flat.set(vec)

    def save_state(self, out, round_: int) -> dict[str, np.ndarray]:
        """The optimiser state, to go into this rank's checkpoint file."""
        return optimizer_arrays(self.opt)

    def load_state(self, out, round_: int, arrays: dict[str, np.ndarray]) -> None:
        load_optimizer_arrays(self.opt, arrays)

    def get(self) -> np.ndarray:
        return self.flat.get()

    def serve(self, devices: dict[int, int], steps: int, total_devices: int) -> None:
        """Train the upper stage for `steps` steps on the micro-batches of `devices` ({rank: seed}).

        Per step: each device's micro-batch gradients summed in micro-batch order, then the mean
        over the devices in rank order (independent of arrival order), one optimiser step.
        """
        self.stage.train()
        order = sorted(devices)
        for j in range(steps):
            acc = {d: np.zeros(self.flat.dim, dtype=np.float64) for d in order}
            for d, i, wire, mask, labels in self.arrivals(devices, j):
                started = time.perf_counter()
                loss = self.forward_backward(wire, mask, labels, self.shapes[d].share(i))
                acc[d] += flat_grads(self.flat)
                for _, p in self.flat.params:
                    p.grad = None
                self.reply(d, wire, loss, derive_seed(devices[d], j, i, 3))
                self.busy_s += time.perf_counter() - started
            started = time.perf_counter()
            set_grads(self.flat, sum(acc[d] for d in order) / total_devices)
            _step(self.flat, self.opt, self.cfg.train.max_grad_norm)
            self.busy_s += time.perf_counter() - started
            self.flush()

    def forward_backward(self, wire: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, share: float, scale: float = 1.0) -> float:
        """Upper stage forward and backward of one micro-batch; returns its loss weighted by its share."""
        loss, _ = self.stage(wire, mask, labels)
        # The whole batch's mean loss is the micro-batches' losses weighted by their share of it.
        (loss * share * scale).backward()
        return float(loss.detach()) * share

    def arrivals(self, devices: dict[int, int], j: int):
        """(device, micro-batch index, wire, mask, labels) of step j in arrival order; one receive
        posted per device at a time, so a device's micro-batches come in order."""
        nxt = {d: 0 for d in devices}
        posted = {d: self._post(d, 0) for d in devices}
        while posted:
            keys = list(posted)
            d = keys[wait_any([posted[x][0] for x in keys], self.poll)]
            _, meta_req, payload, meta = posted.pop(d)
            wait(meta_req, self.poll)
            i = nxt[d]
            nxt[d] = i + 1
            if nxt[d] < len(self.shapes[d].micro):
                posted[d] = self._post(d, nxt[d])
            torch.manual_seed(derive_seed(devices[d], j, i, 1))  # dropout, independent of arrival order
            yield (d, i, *self._unpack(d, i, payload, meta))

    def _post(self, d: int, i: int):
        s = self.shapes[d]
        b = s.micro[i]
        payload = np.empty(self.act.encoded_size(b * s.seq_len * s.hidden), dtype=np.uint8)
        meta = np.empty(s.meta_len(b), dtype=np.int64)
        return self.comm.Irecv(payload, source=d, tag=TAG_ACT), self.comm.Irecv(meta, source=d, tag=TAG_META), payload, meta

    def _unpack(self, d: int, i: int, payload: np.ndarray, meta: np.ndarray):
        s = self.shapes[d]
        b, t, dev = s.micro[i], s.seq_len, self.device
        wire = torch.from_numpy(self.act.decode(payload, b * t * s.hidden)).view(b, t, s.hidden).to(dev, self.dtype).requires_grad_()
        mask = torch.from_numpy(meta[: b * t].copy()).view(b, t).to(dev)
        labels = torch.from_numpy(meta[b * t :].copy())
        return wire, mask, (labels.view(b, t) if s.causal else labels).to(dev)

    def reply(self, d: int, wire: torch.Tensor, loss: float, seed: int, scale: float = 1.0) -> None:
        """Send a micro-batch's boundary gradient (of a loss that was multiplied by `scale`) and its
        loss back; the device posted the receives."""
        g = wire.grad.reshape(-1).to("cpu", torch.float32)
        grad = self.grad.encode((g if scale == 1.0 else g / scale).numpy(), np.random.default_rng(seed))
        out = np.array([loss], dtype=np.float64)
        self.ledger.record(LINK, "down", grad.nbytes + out.nbytes, kind="gradient", raw=wire.grad.numel() * 4 + out.nbytes)
        self._sends.append((self.comm.Isend(grad, dest=d, tag=TAG_GRAD), self.comm.Isend(out, dest=d, tag=TAG_LOSS), grad, out))

    def flush(self) -> None:
        """Complete this step's replies (their buffers live until then)."""
        for g, l, *_ in self._sends:
            wait(g, self.poll)
            wait(l, self.poll)
        self._sends = []


def split_plan(placement, cfg, kind: str, num_labels: int | None) -> dict[int, int | None]:
    """Device rank -> k it runs with (None: whole model). The split devices of one edge share one k,
    the smallest any of them was given (it fits them all), so the edge holds one upper stage."""
    from hierfed.memory import resolve_split

    chosen = resolve_split(placement, cfg, kind, num_labels)
    out: dict[int, int | None] = {}
    for edge in placement.edges:
        ks = [chosen[d.rank] for d in edge.devices if chosen[d.rank] is not None]
        for d in edge.devices:
            out[d.rank] = min(ks) if chosen[d.rank] is not None else None
    for d in placement.devices:
        out.setdefault(d.rank, chosen[d.rank])
    return out
