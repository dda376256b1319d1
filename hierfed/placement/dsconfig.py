"""The DeepSpeed config of an edge group (pure: no torch, no MPI), checked with DeepSpeed's batch
arithmetic before any rank starts and again by each edge when it builds its engine."""

from __future__ import annotations

import copy

from hierfed.errors import HierfedError


def use_deepspeed(cfg, edge_ranks: int) -> bool:
    """deepspeed.enabled: true, or auto and the edge spans several ranks."""
    return cfg.deepspeed.enabled is True or (cfg.deepspeed.enabled == "auto" and edge_ranks > 1)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


SPLIT_FACTORS = ("the micro-batch is train.batch_size / split.micro_batches, rounded up; accumulation is "
                 "split.micro_batches x the split devices of the edge's busiest rank")
LOCAL_FACTORS = "the micro-batch is train.batch_size / edge ranks, rounded up; accumulation is 1"


def ds_config(cfg, micro_batch: int, accumulation: int, group: int, where: str, factors: str = SPLIT_FACTORS,
              clipping: bool = True) -> dict:
    """The DeepSpeed config of one edge group, checked with DeepSpeed's batch arithmetic:
    train_batch_size = micro-batch per rank x gradient accumulation x group size. `clipping`: DeepSpeed
    clips by train.max_grad_norm (False: hierfed clips, by the global norm across the cut)."""
    ds = cfg.deepspeed
    if not clipping and "gradient_clipping" in ds.config:
        raise HierfedError(f"deepspeed ({where}): gradient_clipping in deepspeed.config: an edge with split devices clips by "
                           f"train.max_grad_norm, across the cut (docs/split.md); set that instead")
    zero = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    conf = _merge({
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * group,
        "zero_optimization": zero,
        "gradient_clipping": (cfg.train.max_grad_norm or 0.0) if clipping else 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }, ds.config)
    if conf["zero_optimization"].get("stage") != ds.zero_stage:  # hierfed builds and loads the model by deepspeed.zero_stage
        raise HierfedError(f"deepspeed ({where}): set the ZeRO stage with deepspeed.zero_stage, not deepspeed.config's "
                           f"zero_optimization.stage ({conf['zero_optimization'].get('stage')!r})")
    tb, mb, ga = conf["train_batch_size"], conf["train_micro_batch_size_per_gpu"], conf["gradient_accumulation_steps"]
    if tb != mb * ga * group:
        raise HierfedError(
            f"deepspeed ({where}): train_batch_size {tb} != micro-batch per rank {mb} x gradient accumulation {ga} "
            f"x edge group size {group} = {mb * ga * group} ({factors})"
        )
    if ds.offload_optimizer and cfg.train.optimizer != "adamw":
        raise HierfedError(f"deepspeed ({where}): offload_optimizer needs train.optimizer=adamw (DeepSpeed's CPU Adam)")
    return conf


def split_config(cfg, group: int, split_devices: int, where: str) -> dict:
    """An edge serving `split_devices` split devices on `group` ranks (device i -> rank i mod G):
    every rank of the group builds this same config (DeepSpeed's counts are per group). DeepSpeed's
    own clipping is off: the edge clips by the norm across the cut (`zero.DeepSpeedServer`)."""
    m = cfg.split.micro_batches
    return ds_config(cfg, -(-cfg.train.batch_size // m), m * -(-split_devices // group), group, where, clipping=False)


def local_config(cfg, group: int, where: str) -> dict:
    """An edge training its own client on `group` ranks, one slice of every batch each."""
    return ds_config(cfg, -(-cfg.train.batch_size // group), 1, group, where, LOCAL_FACTORS)


def check_edges(placement, cfg, ks: dict[int, int | None] | None = None) -> None:
    """Every DeepSpeed edge's config as its ranks will build it (one line naming every factor if
    the batch arithmetic does not add up, e.g. after a `deepspeed.config` override). `ks`: the
    split devices' resolved k (`placement.plan.split_plan`); without it an edge whose devices have
    `split_layers: auto` is left for the check that has them."""
    for e in placement.edges:
        g = len(e.ranks)
        if not use_deepspeed(cfg, g):
            continue
        if e.clients:
            local_config(cfg, g, e.name)
        if ks is not None:
            served = e.served(ks)
        else:  # before `auto` is resolved only fixed split_layers say what the edge serves
            served = e.split_devices if all(d.split_layers != "auto" for d in e.split_devices) else ()
        if served:
            split_config(cfg, g, len(served), e.name)
