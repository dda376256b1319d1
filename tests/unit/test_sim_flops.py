"""The simulated clock's FLOPs model (hierfed.sim.flops) against torch's own flop counter.

torch.utils.flop_counter.FlopCounterMode counts the FLOPs of every matmul and attention kernel a
real forward + backward runs; the model prices the same step from parameter counts alone.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hierfed.config import RunConfig
from hierfed.model import build_model
from hierfed.model.cost import step_shape
from hierfed.sim.flops import OPTIMIZER_FLOPS, StepShape, backward_flops, forward_flops, step_flops


@pytest.mark.parametrize("source, kind, labels", [("minilm", "classification", 4), ("llama", "causal_lm", None)])
def test_step_flops_match_torch_flop_counter(source: str, kind: str, labels: int | None) -> None:
    cfg = RunConfig.model_validate({"model": {"source": source}})
    model = build_model(cfg.model, cfg.peft, kind, labels, seed=0).model
    b, t = 8, 32
    ids = torch.randint(100, 1000, (b, t), generator=torch.Generator().manual_seed(0))
    target = torch.zeros(b, dtype=torch.long) if kind == "classification" else ids
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=target).loss.backward()
    s = step_shape(model)
    modelled = forward_flops(s, b, t) + backward_flops(s, b, t)
    assert s.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert modelled == pytest.approx(counter.get_total_flops(), rel=0.10)


def test_step_flops_by_hand() -> None:
    """b=2 sequences of T=3 tokens, 100 matmul weights of which 10 train, one attention layer of width 4."""
    s = StepShape(matmul_params=100, trainable_matmul_params=10, trainable_params=12, attention_layers=1, attention_width=4)
    fwd = 2 * 6 * 100 + 4 * 1 * 2 * 9 * 4
    bwd = 2 * 6 * (100 + 10) + 8 * 1 * 2 * 9 * 4
    assert forward_flops(s, 2, 3) == fwd and backward_flops(s, 2, 3) == bwd
    assert step_flops(s, 2, 3, "sgd") == fwd + bwd + OPTIMIZER_FLOPS["sgd"] * 12


def test_a_split_models_parts_add_up_to_the_whole() -> None:
    """Device part (embeddings + first k blocks) + edge part (the rest) = the whole model's shape."""
    from hierfed.model.cut import prune_for_device, prune_for_edge

    cfg = RunConfig.model_validate({"model": {"source": "llama"}})
    whole = step_shape(build_model(cfg.model, cfg.peft, "causal_lm", None, seed=0).model)
    dev = build_model(cfg.model, cfg.peft, "causal_lm", None, seed=0).model
    edge = build_model(cfg.model, cfg.peft, "causal_lm", None, seed=0).model
    prune_for_device(dev, 1)
    prune_for_edge(edge, 1)
    parts = step_shape(dev) + step_shape(edge)
    assert parts == whole
