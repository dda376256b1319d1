"""FLOPs of a local training step, from a model's matmul shape and the tokens it sees.

The simulated clock prices a step as its FLOPs / the device's rate (hierfed.sim.clock), so that
stragglers are the slow device classes of the topology, not the ranks that lost the CPU of the
machine that ran the job. The model (docs/launch.md, "Simulated clock"), for b sequences of T tokens:

    forward    2·bT·M                       every matmul weight a token passes through (M: linear
             + 4·L·b·T²·A                   layers, adapters, the head) + attention (Q·Kᵀ and P·V
                                            over A = heads × head dim, per layer L)
    backward   2·bT·M                       activation gradients through every matmul, frozen or not
             + 2·bT·Mₜ                      weight gradients of the trainable matmuls (Mₜ) only
             + 8·L·b·T²·A                   attention: dQ, dK, dV, dP
    optimizer  c·N                          c FLOPs per trainable parameter (AdamW ~ 12, SGD ~ 2-4)

Assumptions: embeddings, norms and activations cost no FLOPs (lookups and element-wise work);
attention is priced over the full T×T even when causal (as torch's flop counter does); the first
layer's frozen projections whose input needs no gradient are priced as if it did (a few percent on
a 6-layer model). Checked against torch.utils.flop_counter on MiniLM and a tiny Llama (tests).
Pure: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# FLOPs per trainable parameter of one optimiser step (element-wise work, not matmuls)
OPTIMIZER_FLOPS = {"adamw": 12, "sgd": 3}


@dataclass(frozen=True)
class StepShape:
    """What a training step's FLOPs depend on (from hierfed.model.cost.step_shape)."""

    matmul_params: int  # weights of every matmul a token passes through: linear layers, adapters, head
    trainable_matmul_params: int  # of those, the trainable ones (weight gradients are computed for these)
    trainable_params: int  # every trainable parameter (the optimiser touches each)
    attention_layers: int  # layers with self-attention
    attention_width: int  # heads × head dim: the width of Q·Kᵀ and of P·V

    def __add__(self, o: StepShape) -> StepShape:
        assert self.attention_width == o.attention_width or 0 in (self.attention_layers, o.attention_layers)
        return StepShape(self.matmul_params + o.matmul_params, self.trainable_matmul_params + o.trainable_matmul_params,
                         self.trainable_params + o.trainable_params, self.attention_layers + o.attention_layers,
                         max(self.attention_width, o.attention_width))

    def __sub__(self, o: StepShape) -> StepShape:
        """What a whole model has beyond one of its parts (a split device's): the edge's part."""
        return StepShape(self.matmul_params - o.matmul_params, self.trainable_matmul_params - o.trainable_matmul_params,
                         self.trainable_params - o.trainable_params, self.attention_layers - o.attention_layers, self.attention_width)


def forward_flops(s: StepShape, batch: int, seq: int) -> float:
    return 2.0 * batch * seq * s.matmul_params + 4.0 * s.attention_layers * batch * seq * seq * s.attention_width


def backward_flops(s: StepShape, batch: int, seq: int) -> float:
    tokens = batch * seq
    return 2.0 * tokens * (s.matmul_params + s.trainable_matmul_params) + 8.0 * s.attention_layers * batch * seq * seq * s.attention_width


def step_flops(s: StepShape, batch: int, seq: int, optimizer: str = "adamw") -> float:
    """One local step: forward and backward over a batch of `batch` sequences of `seq` tokens, and
    the optimiser's update."""
    return forward_flops(s, batch, seq) + backward_flops(s, batch, seq) + OPTIMIZER_FLOPS[optimizer] * s.trainable_params
