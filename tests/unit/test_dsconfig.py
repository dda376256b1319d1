"""The DeepSpeed config of an edge group: DeepSpeed's batch arithmetic, checked before launch."""

from __future__ import annotations

from pathlib import Path

import pytest

from hierfed.config import RunConfig
from hierfed.errors import HierfedError
from hierfed.placement.dsconfig import check_edges, ds_config, local_config, split_config, use_deepspeed
from hierfed.topology import load_topology

TOPOS = Path(__file__).resolve().parents[2] / "topologies"


def cfg(**sections) -> RunConfig:
    return RunConfig.model_validate(sections)


def test_generated_config_satisfies_the_arithmetic() -> None:
    conf = ds_config(cfg(deepspeed={"zero_stage": 3, "offload_optimizer": True}), 4, 6, 2, "edge0")
    assert (conf["train_micro_batch_size_per_gpu"], conf["gradient_accumulation_steps"], conf["train_batch_size"]) == (4, 6, 48)
    assert conf["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert conf["gradient_clipping"] == 1.0  # train.max_grad_norm


def test_split_edges_clip_across_the_cut_not_in_deepspeed() -> None:
    """An edge's own client is the whole model: DeepSpeed clips it by train.max_grad_norm. An edge
    with split devices clips by the norm across the cut itself (zero.DeepSpeedServer), so DeepSpeed's
    clipping is off there, and a gradient_clipping in deepspeed.config is refused."""
    c = cfg(train={"max_grad_norm": 0.5})
    assert local_config(c, 2, "edge0")["gradient_clipping"] == 0.5
    assert split_config(c, 2, 2, "edge0")["gradient_clipping"] == 0.0
    bad = cfg(deepspeed={"config": {"gradient_clipping": 0.5}})
    assert local_config(bad, 2, "edge0")["gradient_clipping"] == 0.5
    with pytest.raises(HierfedError, match=r"^deepspeed \(edge0\): gradient_clipping in deepspeed.config: an edge with split "
                                           r"devices clips by train.max_grad_norm"):
        split_config(bad, 2, 2, "edge0")


def test_user_config_is_merged_and_checked() -> None:
    merged = ds_config(cfg(deepspeed={"config": {"zero_optimization": {"overlap_comm": True}}}), 4, 2, 2, "edge0")
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # merged, not replaced
    with pytest.raises(HierfedError) as e:
        ds_config(cfg(deepspeed={"config": {"train_batch_size": 7}}), 4, 2, 2, "edge0")
    msg = str(e.value)
    assert msg.startswith("deepspeed (edge0): train_batch_size 7 != micro-batch per rank 4 x gradient accumulation 2 x edge group size 2 = 16")
    assert "train.batch_size / split.micro_batches" in msg


def test_zero_stage_only_from_deepspeed_zero_stage() -> None:
    """hierfed builds (ZeRO-3: on the CPU, partitioned) and loads the edge model by deepspeed.zero_stage:
    a different stage in deepspeed.config would disagree with it."""
    with pytest.raises(HierfedError, match=r"deepspeed \(edge0\): set the ZeRO stage with deepspeed.zero_stage, "
                                           r"not deepspeed.config's zero_optimization.stage \(3\)"):
        ds_config(cfg(deepspeed={"zero_stage": 2, "config": {"zero_optimization": {"stage": 3}}}), 4, 2, 2, "edge0")
    assert ds_config(cfg(deepspeed={"zero_stage": 3, "config": {"zero_optimization": {"stage": 3}}}), 4, 2, 2, "edge0")["zero_optimization"]["stage"] == 3


def test_offload_needs_adamw() -> None:
    with pytest.raises(HierfedError, match="offload_optimizer needs train.optimizer=adamw"):
        ds_config(cfg(train={"optimizer": "sgd"}, deepspeed={"offload_optimizer": True}), 4, 1, 2, "e")


def test_when_an_edge_uses_deepspeed() -> None:
    assert use_deepspeed(cfg(), 2) and not use_deepspeed(cfg(), 1)
    assert use_deepspeed(cfg(deepspeed={"enabled": True}), 1)
    assert not use_deepspeed(cfg(deepspeed={"enabled": False}), 2)


@pytest.mark.parametrize(
    "topology, bad, factors",
    [
        ("edge-clients", {"train_batch_size": 7}, "micro-batch per rank 8 x gradient accumulation 1 x edge group size 2 = 16"),
        ("zero-edges", {"gradient_accumulation_steps": 3}, "micro-batch per rank 4 x gradient accumulation 3 x edge group size 2 = 24"),
    ],
)
def test_every_deepspeed_edge_is_checked_before_launch(topology: str, bad: dict, factors: str) -> None:
    placement = load_topology(TOPOS / f"{topology}.yaml").placement()
    check_edges(placement, cfg(train={"batch_size": 16}))  # the defaults add up
    with pytest.raises(HierfedError) as e:
        check_edges(placement, cfg(train={"batch_size": 16}, deepspeed={"config": bad}))
    assert "deepspeed (edge0)" in str(e.value) and factors in str(e.value)


def test_single_rank_edges_without_deepspeed_are_not_checked() -> None:
    placement = load_topology(TOPOS / "default.yaml").placement()
    check_edges(placement, cfg(deepspeed={"config": {"train_batch_size": 7}}))  # no edge uses DeepSpeed
