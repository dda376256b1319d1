"""DeepSpeed ZeRO on an edge: the upper stage an edge trains for its split devices, sharded over
the edge's ranks (`ranks: G` in the topology).

Each edge group gets its own torch.distributed process group, made from its MPI communicator: the
group's leader opens a TCPStore on a port the kernel picks, at an address its members can reach,
and broadcasts both, so several edges run side by side in one MPI job (gloo on CPUs, NCCL on
GPUs). Device ranks and the cloud never join a group.

Data parallelism over the micro-batches the edge receives: split device i sends to edge rank
i mod G. ZeRO's collectives run inside forward/backward, so every rank of a group runs the same
number of micro-steps per local step ("slots"): a rank with fewer micro-batches than the busiest
runs zero-weight dummy micro-steps. Unlike the plain edge (one copy of the upper stage per split
device, docs/split.md), the group trains one shared copy: each rank weights a device's losses by
G x (the device's share of the active devices' samples), so ZeRO's mean over the group is the
sample-weighted mean of the devices' gradients. With train.max_grad_norm the group clips by the
norm across the cut (DeepSpeed's own clipping is off): the devices' squared partial norms, weighted
by their shares, plus the shared stage's (`link.shared_squared_norm`); every device gets that number
back and scales by the same factor.
Federation across ZeRO: parameters are read with `safe_get_full_fp32_param` (gathered from the
shards) and written to both the fp32 master shards and the module's (possibly partitioned)
parameters; the optimiser state stays on the edge and is saved with DeepSpeed's own checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from hierfed.comm.channel import wait_all
from hierfed.errors import HierfedError
from hierfed.placement.dsconfig import local_config, split_config
from hierfed.placement.link import LINK, TAG_NORM, Phases, SplitServer, clip_coefficient, shared_squared_norm
from hierfed.seeding import derive_seed
from hierfed.training import local_rank

DS_SUBDIR = "deepspeed"


def quiet_import():
    """deepspeed, with its start-up chatter (op builds, accelerator detection) kept off stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        import deepspeed
    deepspeed.utils.logger.setLevel(logging.WARNING)
    # torch.distributed deprecation notices raised inside DeepSpeed's collectives, on every rank
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    return deepspeed


def init_group(comm: MPI.Comm, leader: bool, backend: str, device: torch.device) -> None:
    """torch.distributed's default process group = this edge group. The leader opens the group's
    TCPStore on a port the kernel picks (port 0: nothing is bound, released and bound again, so no
    other process can take it in between) at an address every member can reach (`rendezvous_address`)
    and broadcasts both. On a GPU the group is bound to this rank's device, which follows the
    node-local MPI rank, not the rank in the group (NCCL would otherwise guess GPU = group rank,
    wrong when several edges share a node)."""
    import datetime

    import torch.distributed as dist

    hosts = comm.allgather(socket.gethostname())
    rank, size = comm.Get_rank(), comm.Get_size()
    timeout = datetime.timedelta(minutes=5)
    store = None
    if leader:
        try:
            addr = rendezvous_address(hosts)
            store = dist.TCPStore(addr, 0, size, is_master=True, timeout=timeout, wait_for_workers=False)
            where: tuple[str, int] | str = (addr, store.port)
        except (HierfedError, RuntimeError, OSError) as e:
            where = f"deepspeed: edge group rendezvous: {e}"
    where = comm.bcast(where if leader else None, root=0)
    if isinstance(where, str):  # the leader could not open the store: every member stops with its line
        raise HierfedError(where)
    addr, port = where
    if store is None:
        store = dist.TCPStore(addr, port, size, is_master=False, timeout=timeout)
    # LOCAL_RANK is the node-local MPI rank (DeepSpeed checks it against Open MPI's own variable).
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank()), MASTER_ADDR=addr, MASTER_PORT=str(port))
    bound = device if device.type == "cuda" and backend == "nccl" else None
    if bound is not None:
        torch.cuda.set_device(bound)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, device_id=bound)


def rendezvous_address(hosts: list[str]) -> str:
    """An address of this node (the group's leader) that every member of its group can reach.

    One node: the loopback. Several: `HIERFED_MASTER_ADDR` when set ("{host}" in it stands for this
    node's name, e.g. "{host}-ib" for a cluster's InfiniBand names), else the source address the
    kernel routes to another member with, else this node's name resolved, unless that is a loopback
    address (Debian-style hosts map their own name to 127.0.1.1, which no other node can reach)."""
    me = socket.gethostname()
    override = os.environ.get("HIERFED_MASTER_ADDR")
    if override:
        return socket.gethostbyname(override.replace("{host}", me))
    if len(set(hosts)) == 1:
        return "127.0.0.1"
    for peer in sorted(set(hosts) - {me}):
        try:
            src = _source_address(socket.gethostbyname(peer))
        except OSError:
            continue
        if not _loopback(src):
            return src
    try:
        own = socket.gethostbyname(me)
    except OSError:
        own = "127.0.0.1"
    if not _loopback(own):
        return own
    raise HierfedError(f"no address of {me} that the other nodes of its edge group ({', '.join(sorted(set(hosts) - {me}))}) can reach: "
                       f"its name resolves to {own}; set HIERFED_MASTER_ADDR to its address on the cluster network (or e.g. '{{host}}-ib')")


def _source_address(peer_ip: str) -> str:
    """The local address the kernel would send to `peer_ip` from (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer_ip, 9))
        return s.getsockname()[0]


def _loopback(ip: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(ip).is_loopback


def load_params(flat, vec: np.ndarray, zero3: bool) -> None:
    """A flat vector into a DeepSpeed engine's trainable parameters: the module's (gathered and
    re-partitioned under ZeRO-3) and the fp32 master shards the optimiser steps."""
    deepspeed = quiet_import()
    from deepspeed.utils import safe_set_full_fp32_param

    src = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32))
    values = [src[a:b] for a, b in zip(flat.offsets[:-1], flat.offsets[1:])]
    params = [p for _, p in flat.params]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=zero3), torch.no_grad():
        for p, v in zip(params, values):
            p.data.copy_(v.view(p.shape).to(p.device, p.dtype))
    for p, v in zip(params, values):
        safe_set_full_fp32_param(p, v.view(getattr(p, "ds_shape", p.shape)).to(p.device))


def gather_params(flat) -> np.ndarray:
    """A DeepSpeed engine's trainable parameters as one flat float32 vector, gathered from the
    shards (collective: every rank of the group calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    def full(p: torch.nn.Parameter) -> torch.Tensor:
        hp = safe_get_full_fp32_param(p)  # None without ZeRO: the parameter itself is the master
        return (p.detach() if hp is None else hp).reshape(-1).to("cpu", torch.float32)

    return np.concatenate([full(p).numpy() for _, p in flat.params])


@contextlib.contextmanager
def _local_rank_env(value: int):
    """LOCAL_RANK set to `value` for the block: `zero.Init` takes its device index from it, while
    the engine later insists LOCAL_RANK equals the launcher's node-local rank."""
    before = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = str(value)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = before


def partition_on(module: torch.nn.Module, conf: dict, device: torch.device) -> None:
    """ZeRO-3 from a module on the CPU: buffers to `device`, then every parameter partitioned over
    the group one at a time (moved to `device` whole, then cut to this rank's shard), so the
    device never holds the whole model; the engine then leaves the module where it is."""
    import torch.distributed as dist

    deepspeed = quiet_import()
    for m in module.modules():
        for name, buf in m._buffers.items():
            if buf is not None:
                m._buffers[name] = buf.to(device)
    with _local_rank_env(device.index if device.type == "cuda" else local_rank()), contextlib.redirect_stdout(io.StringIO()):
        # deepspeed.comm over the edge group first: the config's batch check reads its world size
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, dist_init_required=False)
        # (memory_efficient_linear would replace torch.nn.functional.linear for the whole process)
        init_conf = {**conf, "zero_optimization": {**conf["zero_optimization"], "memory_efficient_linear": False}}
        deepspeed.zero.Init(module=module, config_dict_or_path=init_conf, mem_efficient_linear=False)


# A JIT build of a DeepSpeed op takes minutes; a lock this old was left by a build that was killed.
STALE_BUILD_LOCK_S = 30 * 60


def stale_build_locks(root: Path, now: float, max_age: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """DeepSpeed ops' JIT build locks under torch's extensions root (`root/<op>/lock`, or
    `root/<py>_<accelerator>/<op>/lock` by default) older than `max_age` seconds."""
    out = []
    for lock in sorted([*root.glob("deepspeed_*/lock"), *root.glob("*/deepspeed_*/lock")]):
        try:
            if now - lock.stat().st_mtime > max_age:
                out.append(lock)
        except FileNotFoundError:  # released meanwhile
            pass
    return out


def check_build_locks() -> None:
    """One clear line instead of a silent hang: DeepSpeed JIT-builds its CPU shared-memory comm op
    (deepspeed_shm_comm) when a group starts; torch's FileBaton waits, without a timeout, for as
    long as a `lock` file is in the op's build directory. A build killed midway (a job that timed
    out while compiling) leaves that file behind, and every later DeepSpeed rank waits forever."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    if stale := stale_build_locks(root, time.time()):
        age = (time.time() - stale[0].stat().st_mtime) / 60
        raise HierfedError(f"deepspeed: {stale[0]} is a build lock left by a killed build ({age:.0f} min old); DeepSpeed would "
                           f"wait on it forever: remove it (no build of that op is running)")


def initialize(cfg, module: torch.nn.Module, params: list, conf: dict, device: torch.device):
    """deepspeed.initialize over the edge group (already the default process group): hierfed's
    optimiser with DeepSpeed sharding its state, or DeepSpeed's CPU Adam with offload. Under ZeRO-3
    the module comes from the CPU and is partitioned before the engine is built (`partition_on`)."""
    check_build_locks()
    deepspeed = quiet_import()
    if conf["zero_optimization"]["stage"] == 3:
        partition_on(module, conf, device)
    opt = None
    if not cfg.deepspeed.offload_optimizer:
        from hierfed.training import make_optimizer

        opt = make_optimizer(params, cfg.train)
    else:
        conf["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay}}
    # The device to use: the rank's GPU (ranks may outnumber GPUs on a node), or the CPU.
    gpu = device.index if device.type == "cuda" else local_rank()
    args = argparse.Namespace(device_rank=gpu, local_rank=local_rank())
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its op builds on every rank
        engine, optimizer, _, _ = deepspeed.initialize(args=args, model=module, model_parameters=params, optimizer=opt, config=conf, dist_init_required=False)
    return engine, optimizer


def clear_optimizer_state(opt) -> None:
    """A DeepSpeed engine's optimiser starts afresh on its next step."""
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimiser
    inner.state.clear()  # torch's optimisers (and DeepSpeed's CPU Adam) start afresh on their next step
    if hasattr(opt, "_hp_optimizer_states_linked"):
        # ZeRO-1/2 link each parameter's fp32 fragment to views of the optimiser state once;
        # relink them to the new state after the next step (else they pin the old tensors).
        opt._hp_optimizer_states_linked = False


class DeepSpeedServer(SplitServer):
    """The edge's upper stage as a DeepSpeed engine over the edge group."""

    def __init__(self, comm, model, kind: str, k: int, cfg, ledger, poll: bool, group: MPI.Comm, leader: bool, split_devices: int,
                 where: str, device: torch.device) -> None:
        super().__init__(comm, model, kind, k, cfg, ledger, poll)
        self.group, self.leader, self.split_devices, self.where = group, leader, split_devices, where
        # where the stage runs: under ZeRO-3 the model is still on the CPU here (see `initialize`)
        self.device, self.phases = device, Phases(device, cfg.runtime.profile)

    def make_optimizer(self) -> None:
        params = [p for _, p in self.flat.params]
        conf = split_config(self.cfg, self.group.Get_size(), self.split_devices, self.where)
        self.engine, self.opt = initialize(self.cfg, self.stage, params, conf, self.device)
        self.zero3 = self.cfg.deepspeed.zero_stage == 3

    def load(self, vec: np.ndarray) -> None:
        """The global upper parameters into the engine: module parameters and fp32 master shards;
        the optimiser state cleared too unless split.optimizer_state is persistent."""
        load_params(self.flat, vec, self.zero3)
        self.start_host = np.array(vec, dtype=np.float32)  # on the host (SplitServer.start: a tensor on its device)
        if self.cfg.split.optimizer_state == "fresh":
            clear_optimizer_state(self.opt)

    def update(self, weights: dict[int, float]) -> np.ndarray:
        """The shared stage's update weighted by all its active devices' samples (every rank of the
        group calls this: the parameters are gathered from the shards)."""
        return sum(weights.values()) * (gather_params(self.flat).astype(np.float64) - self.start_host)

    def serve(self, devices: dict[int, int], steps: int, shares: dict[int, float]) -> None:
        """`steps` optimiser steps in lockstep with the group, on this rank's devices' micro-batches;
        `shares`: each active device's share of the active devices' samples."""
        mine = sum(len(self.shapes[d].micro) for d in devices)
        slots = self.group.allreduce(mine, op=MPI.MAX)
        g = self.group.Get_size()
        self.engine.train()
        self.phases.start()
        for j in range(steps):
            arrivals = self.arrivals(devices, j)
            for slot in range(slots):
                self.engine.set_gradient_accumulation_boundary(slot == slots - 1)
                item = next(arrivals, None) if slot < mine else None
                if item is None:
                    self._dummy()
                    self.phases.mark("compute")
                else:
                    d, i, wire, mask, labels = item
                    loss, _ = self.engine(wire, mask, labels)
                    share, scale = self.shapes[d].share(i), g * shares[d]
                    self.engine.backward(loss * share * scale, scale_wrt_gas=False)
                    weighted = float(loss.detach()) * share
                    self.phases.mark("compute")
                    # The device's gradient is of its own loss: undo the group weighting.
                    self.reply(d, wire, weighted, derive_seed(devices[d], j, i, 3), scale)
                if slot == slots - 1 and self.cfg.train.max_grad_norm is not None:
                    self._clip(devices, shares)
                self.engine.step()
                self.phases.mark("step")

    def _clip(self, devices: dict[int, int], shares: dict[int, float]) -> None:
        """After the step's last backward, before engine.step(): clip the shared stage's gradient and
        every active device's blocks by one factor, from `shared_squared_norm` of the shared stage's
        squared gradient norm (under ZeRO-3 summed over the ranks' own partitions, never assembled)
        and the devices' squared partial norms (each device sends its own to its edge rank; this
        number goes back to it: 8 bytes each way, `clip_norm`). The leader's number is every rank's,
        so the shards scale alike."""
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad, safe_set_full_grad, safe_set_local_grad

        got = {d: np.zeros(1, dtype=np.float64) for d in sorted(devices)}
        wait_all([self.comm.Irecv(got[d], source=d, tag=TAG_NORM) for d in got], self.poll)
        parts = {d: v for mine in self.group.allgather({d: float(g[0]) for d, g in got.items()}) for d, v in mine.items()}
        params = [p for _, p in self.flat.params]
        zero3 = any(hasattr(p, "ds_id") for p in params)
        if zero3:  # each rank's own partitions, summed over the group: no rank assembles the full gradient
            r = self.group.Get_rank()
            grads = [safe_get_local_grad(p) for p in params]
            mine = 0.0
            for p, g in zip(params, grads):
                if g is not None:  # the last partitions' padding is not the parameter's: leave it out
                    numel: int = p.ds_numel  # type: ignore[attr-defined]  # ZeRO-3's attribute
                    valid = max(0, min(g.numel(), numel - r * g.numel()))
                    mine += float(g.flatten()[:valid].double().pow(2).sum())
            stage = self.group.allreduce(mine)
        else:  # ZeRO-1/2 replicate the parameters, so a full gradient each is within what a rank holds
            grads = [safe_get_full_grad(p) for p in params]  # collective: every rank of the group, in the same order
            stage = float(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
        total = self.group.bcast(shared_squared_norm(stage, parts, shares) if self.leader else None, root=0)
        out = {d: np.array([total], dtype=np.float64) for d in got}
        for d in out:
            self.ledger.record(LINK, "down", out[d].nbytes, kind="clip_norm")
        requests = [self.comm.Isend(out[d], dest=d, tag=TAG_NORM) for d in out]
        coef = clip_coefficient((total, 0.0), self.cfg.train.max_grad_norm)
        if coef < 1.0:  # each rank writes its own shard (ZeRO-3: safe_set_full_grad mis-cuts a padded partition)
            put = safe_set_local_grad if zero3 else safe_set_full_grad
            for p, g in zip(params, grads):
                if g is not None:
                    put(p, g * coef)
        wait_all(requests, self.poll)

    def _dummy(self) -> None:
        """A zero-weight micro-step: keeps ZeRO's collectives in step when this rank has no micro-batch."""
        config: Any = self.stage.config  # a transformers config (torch's stubs type module attributes as Tensor | Module)
        hidden, causal = config.hidden_size, self.stage.kind == "causal_lm"
        wire = torch.zeros(1, 2, hidden, device=self.device, dtype=self.dtype, requires_grad=True)
        mask = torch.ones(1, 2, dtype=torch.long, device=self.device)
        labels = torch.zeros((1, 2) if causal else (1,), dtype=torch.long, device=self.device)
        loss, _ = self.engine(wire, mask, labels)
        self.engine.backward(loss * 0.0, scale_wrt_gas=False)

    def save_state(self, out: Path, round_: int) -> dict[str, np.ndarray]:
        """DeepSpeed's own checkpoint of the sharded optimiser state (collective over the group)."""
        root = Path(out) / "checkpoints" / "ranks" / f"{DS_SUBDIR}-{self.where}"
        self.engine.save_checkpoint(str(root), tag=f"round-{round_:04d}", save_latest=False, exclude_frozen_parameters=True)
        if self.leader:  # the save is collective: complete on every rank once it returns
            tags = sorted(p for p in root.glob("round-*") if p.is_dir())
            for old in tags[: -(self.cfg.checkpoint.keep + 1)]:
                shutil.rmtree(old, ignore_errors=True)
        return {}

    def load_state(self, out: Path, round_: int, arrays: dict[str, np.ndarray]) -> None:
        root = Path(out) / "checkpoints" / "ranks" / f"{DS_SUBDIR}-{self.where}"
        tag = f"round-{round_:04d}"
        if not (root / tag).is_dir():
            raise HierfedError(f"--resume: {root / tag} is missing (edge {self.where}'s DeepSpeed optimizer state)")
        self.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=False)


class DeepSpeedLocal:
    """The edge's own client (train_locally), trained data-parallel over the edge group.

    Every rank draws the same batch indices as a single-rank trainer would (the client's seed), and
    rank r trains on the r-th of G slices (np.array_split); DeepSpeed averages the gradients over the group,
    and each rank's loss is weighted so that this average is the whole batch's mean loss (the
    slice's share of the batch's loss terms: examples, or target tokens for a causal LM) — so a
    step is the single-rank step on the whole batch. Gradient clipping uses the global norm. The
    client is stateless between edge rounds like every client: its optimiser state (sharded by
    ZeRO) is cleared at the start of each `train`.
    """

    def __init__(self, model, cfg, group: MPI.Comm, where: str, device: torch.device) -> None:
        from hierfed.model import FlatView

        self.model, self.cfg, self.group, self.device = model, cfg, group, device
        self.flat = FlatView(model)
        conf = local_config(cfg, group.Get_size(), where)
        self.engine, self.opt = initialize(cfg, model, [p for _, p in self.flat.params], conf, device)
        self.zero3 = cfg.deepspeed.zero_stage == 3

    def load(self, vec: np.ndarray) -> None:
        load_params(self.flat, vec, self.zero3)

    def get(self) -> np.ndarray:
        return gather_params(self.flat)

    def train(self, data, steps: int, seed: int) -> tuple[float, int]:
        """As LocalTrainer.train, over the group: returns (mean loss, samples seen) of the whole batches."""
        g, r = self.group.Get_size(), self.group.Get_rank()
        clear_optimizer_state(self.opt)
        torch.manual_seed(seed if g == 1 else derive_seed(seed, r))  # dropout: this rank's slice
        rng = np.random.default_rng(seed)  # batch order: the single-rank trainer's
        bs = min(self.cfg.train.batch_size, len(data))  # >= g: checked before launch (hierfed.cluster.preflight)
        self.engine.train()
        total = 0.0
        for _ in range(steps):
            idx = rng.choice(len(data), size=bs, replace=False)
            slices = np.array_split(idx, g)  # sizes differ by at most one; the weighting keeps the mean exact
            terms = [_loss_terms(data.labels[torch.from_numpy(part)]) for part in slices]
            share = terms[r] / max(sum(terms), 1)
            loss = self.engine(**data.batch(slices[r], self.device)).loss
            if terms[r] == 0:  # no target in this slice: its mean is 0/0; it contributes nothing
                loss = torch.nan_to_num(loss, nan=0.0)
            self.engine.backward(loss * share * g, scale_wrt_gas=False)  # DeepSpeed averages over the group
            self.engine.step()
            total += float(loss.detach()) * share
        total = self.group.allreduce(total)  # the whole batches' mean losses, summed over steps
        return total / steps, steps * bs


def _loss_terms(labels: torch.Tensor) -> int:
    """How many terms a slice adds to the batch's mean loss: its examples (classification), or its
    target tokens after the causal shift (labels of -100 are not targets)."""
    if labels.dim() == 1:
        return int(labels.numel())
    return int((labels[:, 1:] != -100).sum())
