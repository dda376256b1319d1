"""Memory prices for split placement: what a device's share of the model costs, and an edge's.

A device with `split_layers: k` holds the embeddings and blocks [0, k) with their adapters; its edge
holds the rest. `estimate` prices that share (`k=None`: the whole model), `edge_estimate` a training
edge's per rank (ZeRO stage, offload), `link_bytes` what crosses the cut per local step;
hierfed.placement.plan turns them into decisions. Parameter counts are exact: they are read from the
model's skeleton built on the meta device with the same PEFT wrapping as the real run, so no
weights are loaded or allocated. Activations are an estimate (see `block_activation_bytes`).

Memory budgets are decimal: memory_gb = 4 means 4e9 bytes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from peft import get_peft_model
from rich import filesize

from hierfed.config import RunConfig
from hierfed.errors import HierfedError
from hierfed.model import load_tokenizer, minilm_path, peft_config
from hierfed.model.build import _base_model

GB = 1e9
# bytes per value on the device-edge link, by codec; int8 also sends one float32 scale per row (token)
CODEC_WIDTH = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
INDEX_BYTES = 8  # attention mask and labels cross the link as the tokenizer's int64


@dataclass(frozen=True)
class Part:
    """Parameters of one piece of the model: frozen count and bytes, trainable count and bytes."""

    frozen: int = 0
    frozen_bytes: int = 0
    trainable: int = 0
    trainable_bytes: int = 0

    def __add__(self, o: Part) -> Part:
        return Part(self.frozen + o.frozen, self.frozen_bytes + o.frozen_bytes,
                    self.trainable + o.trainable, self.trainable_bytes + o.trainable_bytes)


@dataclass(frozen=True)
class Shape:
    """What the estimator needs from a model: its parts (exact) and the sizes activations scale with."""

    embed: Part  # everything registered before block 0 (token/position embeddings, their norm)
    blocks: tuple[Part, ...]  # one per transformer block, adapters included
    head: Part  # everything after the last block (final norm, LM/classification head)
    hidden: int
    heads: int
    ffn: int  # MLP intermediate size
    outputs: int  # vocabulary size (causal LM) or number of labels (classification)
    tied: Part = Part()  # a causal LM head tied to the token embeddings: counted in `embed`, held by the edge too


@dataclass(frozen=True)
class Estimate:
    """Bytes a device needs for its share of the model during one local step."""

    k: int | None  # blocks on the device; None = the whole model
    frozen: int  # frozen base parameters
    adapter: int  # trainable parameters (PEFT adapters, and the head on a whole-model device)
    optimizer: int  # optimizer state for the trainable parameters
    gradients: int  # gradients of the trainable parameters
    activations: int  # saved for backward: every micro-batch graph kept alive at once

    @property
    def total(self) -> int:
        return self.frozen + self.adapter + self.optimizer + self.gradients + self.activations


def skeleton(cfg: RunConfig, kind: str, num_labels: int | None) -> torch.nn.Module:
    """The PEFT-wrapped model as built for a run, but on the meta device: shapes only, no memory."""
    m = cfg.model
    auto = (transformers.AutoModelForSequenceClassification if kind == "classification"
            else transformers.AutoModelForCausalLM)
    extra = {"num_labels": num_labels} if kind == "classification" else {}
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # peft's notes on Conv1D etc.: the real build prints them
        if m.source in ("minilm", "path"):
            if m.source == "minilm" and kind != "classification":
                raise HierfedError("model.source=minilm is an encoder for classification; use gpt2, llama or a path for causal-LM data")
            path = minilm_path() if m.source == "minilm" else m.path
            assert path is not None  # ModelConfig requires model.path with source=path
            try:
                conf = transformers.AutoConfig.from_pretrained(path, **extra)
            except (OSError, ValueError) as e:
                raise HierfedError(f"model.path: cannot read a model config from {path}: {str(e).splitlines()[0]}") from None
            # from_pretrained loads in the checkpoint's dtype (dtype="auto"); price the same
            dtype = conf.dtype if isinstance(getattr(conf, "dtype", None), torch.dtype) else torch.float32
            base = auto.from_config(conf, dtype=dtype)
        else:
            base = _base_model(m, kind, num_labels, load_tokenizer(m))  # the same config as the run
        if m.dtype != "float32":  # as build_model: frozen weights in 16 bits (adapters stay float32)
            base = base.to(getattr(torch, m.dtype))
        if cfg.peft.method == "none":  # full fine-tuning: the plain model, every parameter trains
            return base
        try:
            return get_peft_model(base, peft_config(cfg.peft, kind))
        except (ValueError, TypeError) as e:
            raise HierfedError(f"peft: cannot apply {cfg.peft.method} to {m.source}: {str(e).splitlines()[0]}") from None


_SHAPES: dict[tuple, Shape] = {}


def shape(cfg: RunConfig, kind: str, num_labels: int | None) -> Shape:
    """The model's parts and sizes, read once per (model, peft, task) from its meta skeleton."""
    key = (cfg.model.model_dump_json(), cfg.peft.model_dump_json(), kind, num_labels)
    if key not in _SHAPES:
        _SHAPES[key] = _read_shape(skeleton(cfg, kind, num_labels), kind)
    return _SHAPES[key]


def _read_shape(model: torch.nn.Module, kind: str) -> Shape:
    # a transformers model, PEFT-wrapped or plain (torch's stubs type its attributes as Tensor | Module)
    hf: Any = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
    conf = hf.config
    n = conf.num_hidden_layers
    # The block stack is the ModuleList with one entry per layer (transformer.h, model.layers,
    # bert.encoder.layer); parameters are registered embeddings -> blocks -> head, in that order.
    stack = next(name for name, mod in model.named_modules()
                 if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and name)
    embed, blocks, head, past = Part(), [Part()] * n, Part(), False
    for name, p in model.named_parameters():  # tied weights (GPT-2's lm_head) are listed once
        size = p.numel() * p.element_size()
        part = Part(0, 0, p.numel(), size) if p.requires_grad else Part(p.numel(), size)
        if name.startswith(stack + "."):
            i = int(name[len(stack) + 1:].split(".")[0])
            blocks[i], past = blocks[i] + part, True
        elif past:
            head = head + part
        else:
            embed = embed + part
    hidden = conf.hidden_size
    ffn = getattr(conf, "intermediate_size", None) or getattr(conf, "n_inner", None) or 4 * hidden
    outputs = conf.num_labels if kind == "classification" else conf.vocab_size
    tied = Part()
    if kind == "causal_lm" and getattr(conf, "tie_word_embeddings", False):
        w = hf.get_input_embeddings().weight
        size = w.numel() * w.element_size()
        tied = Part(0, 0, w.numel(), size) if w.requires_grad else Part(w.numel(), size)
    return Shape(embed, tuple(blocks), head, hidden, conf.num_attention_heads, ffn, outputs, tied)


def micro_batching(cfg: RunConfig) -> tuple[int, int]:
    """(micro-batch size, micro-batches per step): batch_size/micro_batches rounded up, and as many
    as that takes (torch.chunk's rule: a batch of 10 in 6 micro-batches is 5 of 2)."""
    b = cfg.train.batch_size
    mb = math.ceil(b / cfg.split.micro_batches)
    return mb, math.ceil(b / mb)


def block_activation_bytes(s: Shape, b: int, t: int) -> int:
    """Activations one transformer block saves for backward, float32, for b sequences of t tokens.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1,
    no parallelism or recomputation): t*b*h*(34 + 5*a*t/h) bytes in 16-bit, of which 11*tbh + 5*a*t²*b
    is attention, 19*tbh the MLP (2 for its input, 16 = 2 x 2 x 4h for the up-projection output and
    the activation output, 1 dropout mask) and 4*tbh the two norms. We write the MLP for its real
    width f (3 + 4f/h, = 19 when f = 4h) and double everything for float32. It is an estimate: it
    assumes eager attention that keeps the a*t*t scores and dropout masks (fused kernels and p=0
    dropout keep less), and omits LoRA's rank-r intermediates (r/h of one tbh term) and allocator slack.
    """
    h, a = s.hidden, s.heads
    per_16bit = t * b * h * (15 + 4 * s.ffn / h) + 5 * a * t * t * b
    return int(2 * per_16bit)


def estimate(cfg: RunConfig, kind: str, num_labels: int | None, k: int | None) -> Estimate:
    """Bytes for the device side holding the embeddings + blocks [0, k) (k=None: the whole model).

    A split device runs its micro-batches pipelined (GPipe-style), so the graphs of all of a step's
    micro-batches are alive until their gradients come back; a whole-model device runs the batch once.
    """
    s, t = shape(cfg, kind, num_labels), cfg.model.max_length
    n_blocks = len(s.blocks)
    _check_k(cfg, k, n_blocks)
    if k is None:
        part = s.embed + sum(s.blocks, Part()) + s.head
        b = cfg.train.batch_size
        # every block's graph, plus the logits and cross-entropy's log-probabilities (float32)
        act = n_blocks * block_activation_bytes(s, b, t) + 2 * 4 * b * (t if kind == "causal_lm" else 1) * s.outputs
    else:
        part = s.embed + sum(s.blocks[:k], Part())
        mb, n = micro_batching(cfg)
        # per micro-batch: k blocks' graphs, plus the boundary activations held until their gradient returns
        act = n * (k * block_activation_bytes(s, mb, t) + 4 * mb * t * s.hidden)
    return Estimate(k, part.frozen_bytes, part.trainable_bytes, 4 * _optimizer_slots(cfg) * part.trainable,
                    part.trainable_bytes, act)


def _check_k(cfg: RunConfig, k: int | None, n_blocks: int) -> None:
    """k blocks on the device side must leave the edge at least one (None: the whole model)."""
    if k is not None and not 1 <= k < n_blocks:
        raise HierfedError(f"split_layers: {k} is out of range: {_model(cfg)} has {n_blocks} blocks, so k must be 1..{n_blocks - 1}")


def _optimizer_slots(cfg: RunConfig) -> int:
    """float32 values of optimiser state per trainable value: AdamW m and v, SGD's momentum buffer."""
    return 2 if cfg.train.optimizer == "adamw" else (1 if cfg.train.momentum > 0 else 0)


@dataclass(frozen=True)
class EdgeEstimate:
    """What one rank of a training edge needs: the upper stage it trains for its split devices, or
    the client it trains itself (`train_locally`), on `ranks` ranks (a ZeRO group when DeepSpeed is on)."""

    name: str
    ranks: int
    trains: str  # what it trains, in words
    engine: str  # "plain torch" or "ZeRO-s over G ranks", and where the optimiser state lives
    per_rank: Estimate  # accelerator (or CPU) memory of one rank of the group
    host: int  # per rank, in host memory: the optimiser state and fp32 master offloaded to the CPU
    single: Estimate  # the same work on one rank with plain torch: what the group saves
    memory_gb: float | None  # the topology's budget per edge rank (None: not given)

    @property
    def fits(self) -> bool:
        return self.memory_gb is None or self.per_rank.total <= self.memory_gb * GB


def edge_estimate(cfg: RunConfig, kind: str, num_labels: int | None, k: int | None, group: int,
                  zero: tuple[int, bool] | None, copies: int = 1) -> tuple[Estimate, int]:
    """(bytes per rank, host bytes per rank) of an edge rank. `k`: it trains the upper stage
    [k, L) + head for split devices, one micro-batch at a time; None: it trains its own client's
    whole model on a ceil(batch / group) slice of each batch. `zero`: (stage, offload) when the edge
    runs DeepSpeed. `copies`: the split devices it serves; a plain edge (no DeepSpeed) serving
    several keeps one optimiser state and one float32 copy of the upper stage's trainable values
    per device (SplitFedV1, docs/split.md; counted as optimiser state), a DeepSpeed group one
    shared stage.

    ZeRO over G ranks (Rajbhandari et al. 2020) divides by G, per rank: from stage 1 the optimiser
    state plus the fp32 master copy DeepSpeed keeps of the trainable values, from stage 2 the
    gradients, at stage 3 the parameters, frozen ones included. Offload moves the optimiser state
    and the master copy to host memory, where DeepSpeed also keeps an fp32 copy of the gradient
    partition. DeepSpeed's communication buckets and stage 3's gathered block are not counted. A
    causal LM head tied to the embeddings (GPT-2) is held by the edge as well.
    """
    s, t = shape(cfg, kind, num_labels), cfg.model.max_length
    n_blocks = len(s.blocks)
    _check_k(cfg, k, n_blocks)
    if k is None:
        part, blocks, b, received = s.embed + sum(s.blocks, Part()) + s.head, n_blocks, math.ceil(cfg.train.batch_size / group), 0
    else:
        b = micro_batching(cfg)[0]
        part, blocks = sum(s.blocks[k:], Part()) + s.head + s.tied, n_blocks - k  # a tied LM head stays with the edge
        received = 4 * b * t * s.hidden  # the boundary activations, a leaf whose gradient goes back down
    # the blocks' graphs, plus the logits and cross-entropy's log-probabilities (float32)
    act = blocks * block_activation_bytes(s, b, t) + received + 2 * 4 * b * (t if kind == "causal_lm" else 1) * s.outputs
    frozen, adapter, grads = part.frozen_bytes, part.trainable_bytes, part.trainable_bytes
    state, host = 4 * _optimizer_slots(cfg) * part.trainable, 0
    if k is not None and zero is None and copies > 1:  # per device: an optimiser state and a copy of the values
        state = copies * (state + 4 * part.trainable)
    if zero is not None and zero[0] >= 1:
        stage, offload = zero
        state = math.ceil((state + 4 * part.trainable) / group)  # + the fp32 master partition
        if offload:  # the optimiser state, the fp32 master and DeepSpeed's fp32 gradient partition
            state, host = 0, state + math.ceil(4 * part.trainable / group)
        if stage >= 2:
            grads = math.ceil(grads / group)
        if stage == 3:
            frozen, adapter = math.ceil(frozen / group), math.ceil(adapter / group)
    return Estimate(k, frozen, adapter, state, grads, act), host


def link_bytes(cfg: RunConfig, k: int | None, kind: str | None = None,
               num_labels: int | None = None) -> tuple[int, int]:
    """(up, down) bytes per local step across a device's cut; (0, 0) for a whole-model device.

    Per micro-batch of mb sequences x T tokens x H hidden: up = activations at the activation
    codec's width (int8: 1 byte + a float32 scale per token) + the attention mask (mb*T int64) +
    labels (mb*T int64 for causal LM, mb for classification); down = their gradients at the
    gradient codec's width. Positions are not sent: both sides derive them from the mask.
    """
    if k is None:
        return 0, 0
    if kind is None:
        kind, num_labels = task_of(cfg)
    h, t = shape(cfg, kind, num_labels).hidden, cfg.model.max_length
    mb, n = micro_batching(cfg)

    def values(codec: str) -> int:
        return mb * t * h * CODEC_WIDTH[codec] + (4 * mb * t if codec == "int8" else 0)

    labels = mb * t if kind == "causal_lm" else mb
    up = values(cfg.split.activation_codec) + INDEX_BYTES * (mb * t + labels)
    return n * up, n * values(cfg.split.gradient_codec)


def task_of(cfg: RunConfig) -> tuple[str, int | None]:
    """(kind, num_labels) of the run's data: built-in topics is 4-way classification, corpus causal LM."""
    from hierfed.data import load_data

    task = load_data(cfg.data)
    return task.kind, task.num_labels


def _model(cfg: RunConfig) -> str:
    m = cfg.model
    return {"path": f"model {m.path}", "minilm": "minilm"}.get(m.source, f"{m.source} {m.size}")


def human(n: float) -> str:
    """Bytes in decimal units, 1 decimal: '5.1 GB', '340.0 MB', '12.0 kB' (rich's file sizes)."""
    return filesize.decimal(int(n), precision=1)
