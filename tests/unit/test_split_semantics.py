"""Split placement's semantics (docs/split.md, SplitFedV1) against plain torch on the uncut model.

The edge side is the real `SplitServer` (per-device copies of the upper stage, their optimisers,
the clip across the cut, the sample-weighted update); only MPI is replaced: micro-batches are
handed to it in an interleaved arrival order by the test, which plays the devices (their blocks
[0, k) on their own copies of the model) and the norm exchange in the same process.
The oracle: each device trains the whole model with plain torch on the same batches (fresh or
persistent SGD momentum, `clip_grad_norm_`), then the sample-weighted mean. (SGD: with Adam, float32
rounding moves near-zero-gradient coordinates by ~1e-5 over a few steps; see tests/mpi/test_deepspeed.py.)
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import hierfed.placement.link as link
from hierfed.comm.ledger import Ledger
from hierfed.config import RunConfig
from hierfed.data.schema import Example
from hierfed.model import FlatView, build_model
from hierfed.model.cut import DeviceStage, prune_for_edge
from hierfed.training import make_optimizer, tokenize

K, STEPS, ROUNDS, MAX_NORM = 1, 3, 2, 0.05
SIZES = {0: 6, 1: 10}  # the two devices' examples: different, so the weighting matters
TEXTS = ["the cat sat on the mat", "federated learning at the edge", "hi there", "split models train too",
         "one more sentence", "a longer sentence about devices and clouds and edges", "short", "words words words",
         "the quick brown fox", "jumps over the lazy dog"]


class Done:
    def Wait(self) -> None:  # noqa: N802 (mpi4py's name)
        pass


def _data(tokenizer, n: int, offset: int):
    return tokenize(tokenizer, [Example(TEXTS[(offset + i) % len(TEXTS)], label=(offset + i) % 3) for i in range(n)], "classification", 16)


def _batches(data, seed: int):
    rng = np.random.default_rng(seed)
    return [data.batch(rng.choice(len(data), size=4, replace=False), torch.device("cpu")) for _ in range(STEPS)]


class InProcessServer(link.SplitServer):
    """SplitServer with the wire replaced: `arrivals` runs the devices' lower blocks here and hands
    their micro-batches over in an interleaved order; `reply` finishes the device's backward."""

    def attach(self, devices: dict, batches: dict) -> None:
        self.devs, self.batches, self.pending = devices, batches, {}

    def arrivals(self, devices, j):
        items = {}
        for d in devices:
            b = self.batches[d][j]
            chunks = list(zip(*(b[x].chunk(2) for x in ("input_ids", "attention_mask", "labels"))))
            hs = [self.devs[d]["stage"](ids, mask) for ids, mask, _ in chunks]
            self.pending[d] = list(hs)
            items[d] = [(d, i, h.detach().requires_grad_(), mask, labels) for i, (h, (_, mask, labels)) in enumerate(zip(hs, chunks))]
        order = [items[1][0], items[0][0], items[0][1], items[1][1]]  # not rank order, not micro-batch-major
        yield from order

    def reply(self, d, wire, loss, seed, scale=1.0):
        self.pending[d].pop(0).backward(wire.grad)


def _whole_reference(model0, batches: dict, optimizer_state: str, cfg) -> np.ndarray:
    """Plain torch on the uncut model: per device, STEPS local steps per round from the round's
    parameters (optimiser state fresh each round or kept), clip_grad_norm_ over all trainable parameters;
    the round's result is the sample-weighted mean of the devices' models."""
    models = {d: copy.deepcopy(model0) for d in SIZES}
    flat0 = FlatView(model0)
    x = flat0.get().astype(np.float64)
    opts: dict = {}
    for r in range(ROUNDS):
        new = np.zeros_like(x)
        for d, m in models.items():
            flat = FlatView(m)
            flat.set(x.astype(np.float32))
            params = [p for _, p in flat.params]
            if optimizer_state == "fresh" or d not in opts:
                opts[d] = make_optimizer(params, cfg.train)
            for b in batches[r][d]:
                m(**b).loss.backward()
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
                opts[d].step()
                opts[d].zero_grad(set_to_none=True)
            new += SIZES[d] * flat.get().astype(np.float64)
        x = new / sum(SIZES.values())
    return x


def _model_and_batches(cfg):
    """The tiny Llama both split tests start from, with randomised adapters (LoRA B starts at 0:
    every gradient non-zero) and no dropout (the comparison is deterministic), and each round's
    batches per device."""
    built = build_model(cfg.model.model_copy(update={"source": "llama", "size": "tiny"}), cfg.peft, "classification", 3, seed=0)
    model0 = built.model
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model0.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model0.eval()
    data = {d: _data(built.tokenizer, n, 3 * d) for d, n in SIZES.items()}
    return model0, [{d: _batches(data[d], 100 * r + d) for d in SIZES} for r in range(ROUNDS)]


def _federate(server, devices, batches, start, up_idx, optimizer_state, cfg, shares) -> np.ndarray:
    """ROUNDS edge rounds of the split devices under `server`, from the whole model's values `start`:
    each device's update covers its own blocks, the server's its upper stage; the edge's FedAvg
    weights them by samples. Returns the whole model's values after the last round."""
    x = start.astype(np.float64)
    for r in range(ROUNDS):
        server.attach(devices, batches[r])
        server.load(x[up_idx].astype(np.float32))
        total = np.zeros_like(x)
        for dev in devices.values():
            dev["flat"].set(x.astype(np.float32))
            if optimizer_state == "fresh" or dev["opt"] is None:
                dev["opt"] = make_optimizer(dev["params"], cfg.train)
        server.serve({d: 0 for d in SIZES}, STEPS, shares)
        for d, dev in devices.items():
            total[dev["idx"]] += SIZES[d] * (dev["flat"].get()[dev["idx"]].astype(np.float64) - x[dev["idx"]])
        total[up_idx] += server.update({d: float(n) for d, n in SIZES.items()})
        x = x + total / sum(SIZES.values())
    return x


@pytest.mark.parametrize("optimizer_state", ["fresh", "persistent"])
def test_split_server_trains_like_whole_model_clients(optimizer_state, monkeypatch):
    cfg = RunConfig(train={"optimizer": "sgd", "momentum": 0.9, "lr": 0.05, "batch_size": 4, "max_grad_norm": MAX_NORM},
                    split={"optimizer_state": optimizer_state})
    model0, batches = _model_and_batches(cfg)

    whole = FlatView(model0)
    edge_model = copy.deepcopy(model0)
    prune_for_edge(edge_model, K)
    server = InProcessServer(None, edge_model, "classification", K, cfg, Ledger(), False)
    server.shapes = {d: link.Shapes(16, model0.config.hidden_size, (2, 2), False) for d in SIZES}
    server.make_optimizer()
    up_idx = link.global_index(whole, server.flat)
    devices = {}
    for d in SIZES:
        m = copy.deepcopy(model0)
        stage = DeviceStage(m, K)
        params = [p for p in stage.parameters() if p.requires_grad]
        idx = np.concatenate([np.arange(a, b) for (n, p), a, b in zip(whole.params, whole.offsets[:-1], whole.offsets[1:])
                              if any(p2 is q for q in params for n2, p2 in FlatView(m).params if n2 == n)])
        devices[d] = {"model": m, "stage": stage, "params": params, "flat": FlatView(m), "idx": idx, "opt": None}
    assert len(np.intersect1d(devices[0]["idx"], up_idx)) == 0 and len(devices[0]["idx"]) + len(up_idx) == whole.dim

    clipped = []

    def exchange(comm, peer, mine, ledger, direction, poll):
        """The device's side of the norm exchange, played here: its partial for the edge's, then its clip and step."""
        dev = devices[peer]
        sq = sum(float(p.grad.double().pow(2).sum()) for p in dev["params"])
        coef = link.clip_coefficient((sq, mine), MAX_NORM)
        clipped.append(coef < 1)
        with torch.no_grad():
            for p in dev["params"]:
                p.grad.mul_(coef)
        dev["opt"].step()
        dev["opt"].zero_grad(set_to_none=True)
        return [Done(), Done()], None, np.array([sq])

    monkeypatch.setattr(link, "exchange_norm", exchange)
    x = _federate(server, devices, batches, whole.get(), up_idx, optimizer_state, cfg, {})

    assert any(clipped) and len(clipped) == ROUNDS * STEPS * len(SIZES)
    ref = _whole_reference(model0, batches, optimizer_state, cfg)
    moved = np.abs(ref - whole.get()).max()
    assert moved > 1e-3
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-6)


def test_clip_from_two_partial_norms_is_clip_grad_norm():
    """Both sides' factor from (device part, edge part) equals clip_grad_norm_ over the union."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen) for n in (5, 7, 3, 11)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    dev, edge = sum(float(g.double().pow(2).sum()) for g in grads[:2]), sum(float(g.double().pow(2).sum()) for g in grads[2:])
    coef = link.clip_coefficient((dev, edge), 0.5)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * coef, rtol=1e-6, atol=0)
    assert link.clip_coefficient((dev, edge), 1e9) == 1.0  # below the bound: no scaling


def test_memory_plan_counts_a_copy_and_an_optimiser_per_split_device():
    """A plain edge serving n split devices holds n float32 copies of the upper trainable values
    and n optimiser states (AdamW: 2 values each); a DeepSpeed group holds one shared stage."""
    from hierfed.config import DataConfig, ModelConfig
    from hierfed.placement import memory

    cfg = RunConfig(model=ModelConfig(source="gpt2", size="tiny"), data=DataConfig(source="corpus"))
    one, three = (memory.edge_estimate(cfg, "causal_lm", None, 1, 1, None, n)[0] for n in (1, 3))
    s = memory.shape(cfg, "causal_lm", None)
    trainable = (sum(s.blocks[1:], memory.Part()) + s.head + s.tied).trainable
    assert trainable > 0
    assert three.optimizer == 3 * (2 * 4 * trainable + 4 * trainable) and one.optimizer == 2 * 4 * trainable
    assert three.total - one.total == three.optimizer - one.optimizer
    zero = [memory.edge_estimate(cfg, "causal_lm", None, 1, 2, (1, False), n)[0].total for n in (1, 3)]
    assert zero[0] == zero[1]


# --- DeepSpeed edges: one upper stage shared by the split devices (docs/split.md) ---------------

class FakeLink:
    """The devices' side of the norm exchange with a DeepSpeed edge, played in this process: `Irecv`
    hands the edge a device's squared partial norm; `Isend` gives it the number the step is clipped
    by, and the device clips by it and steps."""

    def __init__(self, devices: dict) -> None:
        self.devices, self.clipped = devices, []

    def Irecv(self, buf, source, tag):  # noqa: N802 (mpi4py's name)
        buf[0] = sum(float(p.grad.double().pow(2).sum()) for p in self.devices[source]["params"])
        return Done()

    def Isend(self, buf, dest, tag):  # noqa: N802
        dev = self.devices[dest]
        coef = link.clip_coefficient((float(buf[0]), 0.0), MAX_NORM)
        self.clipped.append(coef < 1)
        with torch.no_grad():
            for p in dev["params"]:
                p.grad.mul_(coef)
        dev["opt"].step()
        dev["opt"].zero_grad(set_to_none=True)
        return Done()


def _shared_reference(model0, batches: dict, up_idx: np.ndarray, optimizer_state: str, cfg) -> np.ndarray:
    """Plain torch, the shared-stage semantics: per step every device computes its loss on the uncut
    model through the one shared upper stage; the shared stage steps on the sample-weighted mean of the
    devices' upper gradients, each device on its own blocks' gradient; all are scaled by one factor
    from sqrt(|G|^2 + sum_d w_d |g_d|^2) (torch's clip_grad_norm_ arithmetic over [G, sqrt(w_d) g_d]).
    The round's result: the shared stage, and the sample-weighted mean of the devices' blocks."""
    total_n = sum(SIZES.values())
    w = {d: n / total_n for d, n in SIZES.items()}
    models = {d: copy.deepcopy(model0) for d in SIZES}
    shared = copy.deepcopy(model0)
    x = FlatView(model0).get().astype(np.float64)
    upper = np.zeros(len(x), dtype=bool)
    upper[up_idx] = True

    def split_params(m):
        flat = FlatView(m)
        idx = [np.arange(a, b) for a, b in zip(flat.offsets[:-1], flat.offsets[1:])]
        return ([p for (_, p), i in zip(flat.params, idx) if upper[i].all()], [p for (_, p), i in zip(flat.params, idx) if not upper[i].any()])

    shared_up, _ = split_params(shared)
    opts: dict = {}
    for r in range(ROUNDS):
        for m in [*models.values(), shared]:
            FlatView(m).set(x.astype(np.float32))
        if optimizer_state == "fresh" or not opts:
            opts = {"shared": make_optimizer(shared_up, cfg.train), **{d: make_optimizer(split_params(m)[1], cfg.train) for d, m in models.items()}}
        for j in range(STEPS):
            grads_up = [torch.zeros_like(p) for p in shared_up]
            sq_lower = {}
            for d, m in models.items():
                up, low = split_params(m)
                with torch.no_grad():
                    for p, s in zip(up, shared_up):
                        p.copy_(s)
                m(**batches[r][d][j]).loss.backward()
                for acc, p in zip(grads_up, up):
                    acc += w[d] * p.grad
                sq_lower[d] = sum(float(p.grad.double().pow(2).sum()) for p in low)
                for p in up:
                    p.grad = None
            total = sum(float(g.double().pow(2).sum()) for g in grads_up) + sum(w[d] * sq_lower[d] for d in SIZES)
            coef = min(1.0, MAX_NORM / (total**0.5 + 1e-6))
            for p, g in zip(shared_up, grads_up):
                p.grad = g * coef
            for m in models.values():
                for p in split_params(m)[1]:
                    p.grad.mul_(coef)
            for opt in opts.values():
                opt.step()
                opt.zero_grad(set_to_none=True)
        new = x.copy()
        new[upper] = FlatView(shared).get().astype(np.float64)[upper]
        new[~upper] = sum(w[d] * FlatView(m).get().astype(np.float64)[~upper] for d, m in models.items())
        x = new
    return x


class InProcessDeepSpeed:
    """The real DeepSpeedServer on a group of one (gloo, COMM_SELF), its wire replaced as above."""

    @staticmethod
    def make(cfg, edge_model, monkeypatch):
        from deepspeed.utils import groups
        from mpi4py import MPI

        from hierfed.placement import zero

        # DeepSpeed caches the groups it made from the process group of an earlier test in this process
        for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
            monkeypatch.setattr(groups, name, None)

        class Server(zero.DeepSpeedServer):
            attach, arrivals = InProcessServer.attach, InProcessServer.arrivals

            def reply(self, d, wire, loss, seed, scale=1.0):
                self.pending[d].pop(0).backward(wire.grad / scale)

        zero.init_group(MPI.COMM_SELF, True, "gloo", torch.device("cpu"))
        return Server(None, edge_model, "classification", K, cfg, Ledger(), False, MPI.COMM_SELF, True, len(SIZES), "edge0", torch.device("cpu"))


@pytest.mark.parametrize("stage, optimizer_state", [(2, "fresh"), (3, "persistent")])
def test_deepspeed_edge_trains_one_shared_stage(stage, optimizer_state, monkeypatch):
    """A DeepSpeed edge serving two split devices of different sizes (docs/split.md, DeepSpeed edges):
    one upper stage on the sample-weighted mean gradient, clipping on and binding by the norm across
    the cut, optimiser state fresh or kept, 2 rounds of 3 steps, against `_shared_reference`. Fails
    with DeepSpeed's own clipping (by the upper stage's norm), an unweighted mean, or state that is
    kept when it should be fresh."""
    import torch.distributed as dist

    cfg = RunConfig(train={"optimizer": "sgd", "momentum": 0.9, "lr": 0.05, "batch_size": 4, "max_grad_norm": MAX_NORM},
                    split={"optimizer_state": optimizer_state, "micro_batches": 2}, deepspeed={"zero_stage": stage})
    model0, batches = _model_and_batches(cfg)
    whole = FlatView(model0)
    edge_model = copy.deepcopy(model0)
    prune_for_edge(edge_model, K)
    up_idx = link.global_index(whole, FlatView(edge_model))
    devices = {}
    for d in SIZES:
        m = copy.deepcopy(model0)
        stage_d = DeviceStage(m, K)
        params = [p for p in stage_d.parameters() if p.requires_grad]
        low = np.setdiff1d(np.arange(whole.dim), up_idx)
        devices[d] = {"stage": stage_d, "params": params, "flat": FlatView(m), "idx": low, "opt": None}

    server = InProcessDeepSpeed.make(cfg, edge_model, monkeypatch)
    try:
        server.shapes = {d: link.Shapes(16, model0.config.hidden_size, (2, 2), False) for d in SIZES}
        server.comm = fake = FakeLink(devices)
        server.make_optimizer()
        shares = {d: n / sum(SIZES.values()) for d, n in SIZES.items()}
        x = _federate(server, devices, batches, whole.get(), up_idx, optimizer_state, cfg, shares)
        norm_bytes = server.ledger.total[(link.LINK, "down", "clip_norm")]
    finally:
        server.engine.destroy()
        dist.destroy_process_group()

    assert any(fake.clipped) and len(fake.clipped) == ROUNDS * STEPS * len(SIZES)
    ref = _shared_reference(model0, batches, up_idx, optimizer_state, cfg)
    assert np.abs(ref - whole.get()).max() > 1e-3
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-6)
    assert norm_bytes == 8 * ROUNDS * STEPS * len(SIZES)  # one float64 back to each device per step
