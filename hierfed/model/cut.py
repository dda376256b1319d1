"""Split placement: a weak device runs the embeddings and blocks [0, k); its edge runs the rest.

`split_model` cuts a PEFT-wrapped model (from `hierfed.model.build_model`) at block k into a
`DeviceStage` and an `EdgeStage` that share the model's modules and together compute exactly what
the whole model computes, loss included. Across the cut travel only the hidden states [B, T, H],
the attention mask and the labels; positions, rotary tables and attention masks are rebuilt on each
side from T and the attention mask. One micro-batch, as the runtime wires it:

    h = device(input_ids, attention_mask)                       # device
    wire = h.detach().requires_grad_()                          # ── h, mask, labels ──► edge
    loss, logits = edge(wire, attention_mask, labels)           # edge
    loss.backward()                                             # ◄── wire.grad ── edge
    h.backward(wire.grad)                                       # device

`prune_for_device` / `prune_for_edge` drop, in place, what the other side holds; parameter names
stay those of the whole model, so `side_of` splits the global FlatView by name. See docs/split.md.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from hierfed.errors import HierfedError

ARCHS = ("gpt2", "llama", "bert")

# Per architecture: the block list, what only the device holds (embeddings), what only the edge
# holds (final norm, rotary, heads). Paths are relative to the transformers model inside the PeftModel.
_BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers", "bert": "bert.encoder.layer"}
_DEVICE_ONLY = {"gpt2": ("transformer.wte", "transformer.wpe"), "llama": ("model.embed_tokens",), "bert": ("bert.embeddings",)}
_EDGE_ONLY = {
    "gpt2": ("transformer.ln_f", "score", "lm_head"),
    "llama": ("model.norm", "model.rotary_emb", "score", "lm_head"),
    "bert": ("bert.pooler", "classifier"),
}
_HEADS = {"classification": ("score", "classifier"), "causal_lm": ("lm_head",)}


class Pruned(nn.Module):
    """Stands where a pruned module was: keeps the other modules' names (and indices) unchanged."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.what} was pruned by hierfed.model.cut: this rank holds only one side of the split model")

    def extra_repr(self) -> str:
        return self.what


def _hf(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a PeftModel (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    hf = get_base_model() if callable(get_base_model) else model
    _check_arch(getattr(getattr(hf, "config", None), "model_type", None))  # an unsupported architecture says which
    if not isinstance(hf, PreTrainedModel):
        raise HierfedError(f"split placement needs a transformers model (optionally PEFT-wrapped); got {type(hf).__name__}")
    return hf


def _arch(model: nn.Module) -> str:
    return _check_arch(getattr(_hf(model).config, "model_type", None))


def _check_arch(model_type: str | None) -> str:
    if model_type not in ARCHS:
        raise HierfedError(f"split placement supports gpt2, llama and bert models; got {model_type}")
    return model_type


def _get(hf: nn.Module, path: str) -> nn.Module:
    return hf.get_submodule(path)


def _set(hf: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(hf.get_submodule(parent) if parent else hf, name, module)


def _has(hf: nn.Module, path: str) -> bool:
    try:
        hf.get_submodule(path)
    except AttributeError:
        return False
    return True


def _blocks(hf: nn.Module, arch: str) -> nn.ModuleList:
    blocks = _get(hf, _BLOCKS[arch])
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{_BLOCKS[arch]} of a {arch} model is a {type(blocks).__name__}, not the ModuleList of its blocks")
    return blocks


def _present(module: nn.Module, what: str) -> nn.Module:
    if isinstance(module, Pruned):
        raise ValueError(f"{what} was pruned from this model; it cannot build this stage")
    return module


def num_blocks(model: nn.Module) -> int:
    """Transformer blocks L of the model (pruned placeholders included: L never changes)."""
    hf = _hf(model)
    return len(_blocks(hf, _arch(hf)))


def _check_k(model: nn.Module, k: int) -> None:
    n = num_blocks(model)
    if not 1 <= k < n:
        raise HierfedError(f"split_layers={k}: a {_arch(model)} model with {n} blocks splits at 1 <= k < {n}")


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    # As the HF models do without a cache: positions 0..T-1, shape [1, T].
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _mask(fn, config, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None):
    """Call a transformers mask builder with the argument names of the installed version
    (5.2x: inputs_embeds, cache; earlier 5.x: input_embeds, past_key_values, cache_position)."""
    params = inspect.signature(fn).parameters
    kw = {"config": config, "attention_mask": attention_mask}
    kw["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = hidden
    kw.update({name: None for name in ("cache", "past_key_values") if name in params})
    if "cache_position" in params:
        kw["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    if "position_ids" in params and position_ids is not None:
        kw["position_ids"] = position_ids
    return fn(**kw)


def _run_blocks(arch, config, blocks, hidden, attention_mask, rotary=None) -> torch.Tensor:
    """Blocks as the HF model calls them (no cache): the mask is rebuilt here from attention_mask."""
    if arch == "bert":
        mask = _mask(create_bidirectional_mask, config, hidden, attention_mask)
        for block in blocks:
            hidden = block(hidden, attention_mask=mask)
        return hidden
    pos = _positions(hidden)
    mask = _mask(create_causal_mask, config, hidden, attention_mask, pos)
    if arch == "gpt2":
        for block in blocks:
            hidden = block(hidden, attention_mask=mask, use_cache=False, position_ids=pos)
        return hidden
    cos_sin = rotary(hidden, position_ids=pos)  # llama: the rotary tables, recomputed on each side
    for block in blocks:
        hidden = block(hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=pos, use_cache=False)
    return hidden


def _last_token(mask: torch.Tensor) -> torch.Tensor:
    """Rightmost position whose mask is 1: HF's rightmost non-pad token, computed the same way."""
    idx = torch.arange(mask.shape[-1], device=mask.device, dtype=torch.int32)
    return (idx * mask.to(torch.int32)).argmax(-1)


class DeviceStage(nn.Module):
    """Embeddings and blocks [0, k): `forward(input_ids, attention_mask)` -> hidden states [B, T, H]."""

    # The embeddings, registered under their names in the whole model (_DEVICE_ONLY): one set per arch.
    wte: nn.Module  # gpt2
    wpe: nn.Module  # gpt2
    embed_tokens: nn.Module  # llama
    embeddings: nn.Module  # bert
    config: Any  # the transformers config: its fields depend on the architecture

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        hf = _hf(model)
        self.arch, self.k, self.config = _arch(hf), k, hf.config
        _check_k(model, k)
        blocks = _blocks(hf, self.arch)
        self.blocks = nn.ModuleList(_present(blocks[i], f"block {i}") for i in range(k))
        for path in _DEVICE_ONLY[self.arch]:
            self.add_module(path.rpartition(".")[2], _present(_get(hf, path), path))
        if self.arch == "gpt2":
            self.drop = _get(hf, "transformer.drop")
        elif self.arch == "llama":
            self.rotary_emb = _get(hf, "model.rotary_emb")
        # GPT-2/Llama classifiers pool the rightmost token that is not pad_token_id; the edge finds it
        # from the attention mask, so the device checks that both agree (see _check_pooling).
        self.pad_token_id = hf.config.pad_token_id if type(hf).__name__.endswith("ForSequenceClassification") and self.arch != "bert" else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pad_token_id is not None:
            self._check_pooling(input_ids, attention_mask, self.pad_token_id)
        if self.arch == "bert":
            # token_type_ids and positions default as in BertModel (zeros, arange)
            hidden = self.embeddings(input_ids=input_ids)
            return _run_blocks("bert", self.config, self.blocks, hidden, attention_mask)
        if self.arch == "gpt2":
            hidden = self.drop(self.wte(input_ids) + self.wpe(_positions(input_ids)))
            return _run_blocks("gpt2", self.config, self.blocks, hidden, attention_mask)
        hidden = self.embed_tokens(input_ids)
        return _run_blocks("llama", self.config, self.blocks, hidden, attention_mask, self.rotary_emb)

    def _check_pooling(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad: int) -> None:
        # Equal whenever pad tokens sit exactly where the mask is 0 (our tokenizers); a text that
        # ends in pad_token_id (e.g. pad = eos) would be pooled differently by HF: refuse it.
        if not torch.equal(_last_token((input_ids != pad).long()), _last_token(attention_mask)):
            raise HierfedError(
                f"split placement: a text ends in the pad token (id {pad}), so the classifier would pool "
                "a different token than the attention mask marks last; use a tokenizer whose pad token is not in the text"
            )


class EdgeStage(nn.Module):
    """Blocks [k, L), final norm, head and loss: `forward(hidden, attention_mask, labels)` -> (loss, logits).

    Logits are what the whole model returns (pooled [B, C] for classification, [B, T, V] for causal
    LM); loss is None when labels is None.
    """

    config: Any  # the transformers config: its fields depend on the architecture

    def __init__(self, model: nn.Module, kind: str, k: int) -> None:
        super().__init__()
        hf = _hf(model)
        self.arch, self.kind, self.k, self.config = _arch(hf), kind, k, hf.config
        _check_k(model, k)
        if kind not in _HEADS:
            raise ValueError(f"kind must be 'classification' or 'causal_lm', got {kind!r}")
        if self.arch == "bert" and kind != "classification":
            raise HierfedError("split placement: bert models are encoders for classification, not causal_lm")
        blocks = _blocks(hf, self.arch)
        self.blocks = nn.ModuleList(_present(blocks[i], f"block {i}") for i in range(k, len(blocks)))
        head = next((h for h in _HEADS[kind] if hasattr(hf, h)), None)
        if head is None:
            raise ValueError(f"a {kind} model needs one of {_HEADS[kind]}; {type(hf).__name__} has none")
        self.head = _present(_get(hf, head), head)  # a PEFT ModulesToSaveWrapper for classifiers
        if self.arch == "gpt2":
            self.norm = _present(_get(hf, "transformer.ln_f"), "transformer.ln_f")
        elif self.arch == "llama":
            self.norm = _present(_get(hf, "model.norm"), "model.norm")
            self.rotary_emb = _get(hf, "model.rotary_emb")
        else:
            self.pooler = _present(_get(hf, "bert.pooler"), "bert.pooler")
            self.dropout = _get(hf, "dropout")
        # GPT-2 / Llama causal LM: the model's own loss (ForCausalLMLoss: shift, ignore -100, mean).
        self._lm_loss: Callable[..., torch.Tensor] | None = hf.loss_function if kind == "causal_lm" else None

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None):
        hidden = _run_blocks(self.arch, self.config, self.blocks, hidden, attention_mask, getattr(self, "rotary_emb", None))
        if self.arch == "bert":
            logits = self.head(self.dropout(self.pooler(hidden)))
            return self._cls_loss(logits, labels), logits
        hidden = self.norm(hidden)
        logits = self.head(hidden)
        if self.kind == "causal_lm":
            assert self._lm_loss is not None  # set in __init__ for kind "causal_lm"
            loss = None if labels is None else self._lm_loss(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
            return loss, logits
        batch = logits.shape[0]
        last: int | torch.Tensor
        if self.config.pad_token_id is None:  # as HF: no pad token, the last position
            if batch != 1:
                raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
            last = -1
        else:
            last = _last_token(attention_mask.to(logits.device))
        pooled = logits[torch.arange(batch, device=logits.device), last]
        return self._cls_loss(pooled, labels), pooled

    def _cls_loss(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
        # HF's sequence-classification loss (problem_type: regression / single- / multi-label), mean.
        return None if labels is None else ForSequenceClassificationLoss(labels=labels, pooled_logits=logits, config=self.config)


def split_model(model: nn.Module, kind: str, k: int) -> tuple[DeviceStage, EdgeStage]:
    """Both stages of `model` cut at block k (1 <= k < L). They share the model's modules: no copies.

    On a pruned model build only the stage it kept: `DeviceStage(model, k)` or `EdgeStage(model, kind, k)`.
    """
    return DeviceStage(model, k), EdgeStage(model, kind, k)


def pad_blocks(model: nn.Module, total: int) -> None:
    """A model loaded with only its first k blocks, padded to `total` entries with `Pruned`
    placeholders: blocks keep their indices, parameters their names (`model._load_first_blocks`)."""
    hf = _hf(model)
    blocks = _blocks(hf, _arch(hf))
    blocks.extend(Pruned(f"block {i}") for i in range(len(blocks), total))


def prune_for_device(model: nn.Module, k: int) -> None:
    """Keep the embeddings and blocks [0, k); drop blocks [k, L), the final norm and the head (in place)."""
    hf = _hf(model)
    arch = _arch(hf)
    _check_k(model, k)
    blocks = _blocks(hf, arch)
    for i in range(k, len(blocks)):
        blocks[i] = Pruned(f"block {i}")
    for path in _EDGE_ONLY[arch]:
        if path != "model.rotary_emb" and _has(hf, path):  # rotary has no weights and the device needs it
            _set(hf, path, Pruned(path))


def prune_for_edge(model: nn.Module, k: int) -> None:
    """Keep blocks [k, L), rotary, norms and the head; drop the embeddings and blocks [0, k) (in place).

    GPT-2's LM head is tied to wte: `lm_head` holds the same (frozen) Parameter, so the matrix stays.
    """
    hf = _hf(model)
    arch = _arch(hf)
    _check_k(model, k)
    blocks = _blocks(hf, arch)
    for i in range(k):
        blocks[i] = Pruned(f"block {i}")
    for path in _DEVICE_ONLY[arch]:
        _set(hf, path, Pruned(path))


def _component(path: str) -> str:
    # "model.layers" -> r"(?:^|\.)model\.layers" : match whole name components only
    return r"(?:^|\.)" + re.escape(path)


_SIDE_RE = {
    arch: (
        re.compile(_component(_BLOCKS[arch]) + r"\.(\d+)\."),
        re.compile("|".join(_component(p) + r"(?:\.|$)" for p in _DEVICE_ONLY[arch])),
        re.compile("|".join(_component(p) + r"(?:\.|$)" for p in _EDGE_ONLY[arch])),
    )
    for arch in ARCHS
}


def side_of(param_name: str, model_type: str, k: int) -> Literal["device", "edge"]:
    """Which side holds (and trains) a parameter, from its name in the whole (or pruned) model.

    Blocks [0, k) and embeddings: device; blocks [k, L), final norm and heads (incl. PEFT
    modules_to_save copies): edge. GPT-2's tied LM head matrix is frozen and held by both sides; its
    name in the whole model (`transformer.wte.weight`) says device. An unknown name raises ValueError.
    """
    block, device, edge = _SIDE_RE[_check_arch(model_type)]
    m = block.search(param_name)
    if m:
        return "device" if int(m.group(1)) < k else "edge"
    if device.search(param_name):
        return "device"
    if edge.search(param_name):
        return "edge"
    raise ValueError(f"side_of: no split side known for parameter {param_name!r} of a {model_type} model")
