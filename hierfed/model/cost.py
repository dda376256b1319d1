"""The FLOPs shape of a (PEFT-wrapped, possibly pruned) model: its matmul weights, frozen and
trainable, and its attention, read from the modules themselves (a real model or a meta skeleton),
for hierfed.sim.flops. A split device's pruned model gives the device's share, its edge's the rest."""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from hierfed.sim.flops import StepShape


def step_shape(model: torch.nn.Module) -> StepShape:
    """Count every matmul weight of `model` (nn.Linear, GPT-2's Conv1D: adapters' A and B included)
    and its attention layers (modules with a `num_heads`/`num_attention_heads` and head dim)."""
    matmul = trainable_mm = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, Conv1D)):
            n = m.weight.numel()
            matmul += n
            trainable_mm += n if m.weight.requires_grad else 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers, width = _attention(model)
    return StepShape(matmul, trainable_mm, trainable, layers, width)


def _attention(model: torch.nn.Module) -> tuple[int, int]:
    """(self-attention layers present, heads × head dim) from the model's attention modules."""
    conf = getattr(model, "config", None) or getattr(getattr(model, "base_model", None), "config", None)
    layers = 0
    for m in model.modules():
        name = type(m).__name__
        if name.endswith(("SelfAttention", "Attention")) and not name.endswith("SdpaAttention") and _is_core(m):
            layers += 1
    if conf is None or layers == 0:
        return layers, 0
    heads = getattr(conf, "num_attention_heads", None) or conf.n_head
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // heads
    return layers, heads * head_dim


def _is_core(m: torch.nn.Module) -> bool:
    """The module that computes attention itself (BertSelfAttention, LlamaAttention,
    GPT2Attention), not a wrapper around it (BertAttention holds a BertSelfAttention)."""
    return not any(type(c).__name__.endswith(("SelfAttention", "Attention")) for c in m.children())
