"""model.dtype: the frozen base in the asked dtype, every trainable parameter in float32 (README's
promise), and one local step that trains on 16-bit bases (bf16, fp16) for several PEFT methods."""

from __future__ import annotations

import pytest
import torch
import transformers

from hierfed.config import load_config
from hierfed.model import build_model


def _step(model, kind: str) -> torch.Tensor:
    ids = torch.randint(5, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1]) if kind == "classification" else ids
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    out.loss.backward()
    return out.loss


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("source, method", [("minilm", "lora"), ("minilm", "ia3"), ("gpt2", "lora"), ("llama", "loha")])
def test_16_bit_base_trains_float32_adapters_and_head(source, method, dtype):
    kind = "classification" if source == "minilm" else "causal_lm"
    sets = [f"model.source={source}", f"model.dtype={dtype}", f"peft.method={method}"] + (["model.size=tiny"] if source != "minilm" else [])
    cfg = load_config(None, sets)
    model = build_model(cfg.model, cfg.peft, kind, 4 if kind == "classification" else None, 0).model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values()), {n: p.dtype for n, p in trainable.items()}
    assert frozen and all(p.dtype == getattr(torch, dtype) for p in frozen)
    if kind == "classification":  # the trained head (peft's modules_to_save copy) is among them
        assert any("modules_to_save" in n for n in trainable)
    loss = _step(model, kind)
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())


def test_float32_is_applied_to_a_checkpoint_saved_in_bf16(tmp_path):
    """Recent transformers load a checkpoint in its saved dtype; model.dtype: float32 must still be float32."""
    conf = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=30522, n_positions=128)
    transformers.GPT2LMHeadModel(conf).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    cfg = load_config(None, ["model.source=path", f"model.path={tmp_path / 'm'}", "model.dtype=float32", "peft.method=lora"])
    model = build_model(cfg.model, cfg.peft, "causal_lm", None, 0).model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
