"""Models: every source builds offline, PEFT methods apply, the flat view covers exactly what trains."""

from __future__ import annotations

import pytest
import torch

from hierfed.config import ModelConfig, PeftConfig
from hierfed.errors import HierfedError
from hierfed.model import FlatView, _base_model, build_model, load_tokenizer


@pytest.mark.parametrize("source", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["classification", "causal_lm"])
def test_config_built_models_are_seeded_and_identical(source, kind):
    a = build_model(ModelConfig(source=source), PeftConfig(r=4), kind, 4 if kind == "classification" else None, seed=3)
    b = build_model(ModelConfig(source=source), PeftConfig(r=4), kind, 4 if kind == "classification" else None, seed=3)
    fa, fb = FlatView(a.model), FlatView(b.model)
    assert fa.base_fingerprint() == fb.base_fingerprint()
    assert fa.fingerprint() == fb.fingerprint()
    assert (fa.get() == fb.get()).all()
    c = build_model(ModelConfig(source=source), PeftConfig(r=4), kind, 4 if kind == "classification" else None, seed=4)
    assert FlatView(c.model).base_fingerprint() != fa.base_fingerprint()


def test_only_adapter_and_head_train():
    built = build_model(ModelConfig(source="minilm"), PeftConfig(r=8), "classification", 4, seed=0)
    flat = FlatView(built.model)
    names = [n for n, _ in flat.params]
    assert all("lora_" in n or "classifier" in n for n in names), names
    total = sum(p.numel() for p in built.model.parameters())
    assert 0 < flat.dim < 0.01 * total


@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "ia3"])
def test_peft_methods(method):
    built = build_model(ModelConfig(source="llama"), PeftConfig(method=method, r=4), "causal_lm", None, seed=0)
    flat = FlatView(built.model)
    assert flat.dim > 0
    vec = flat.get() + 1.0
    flat.set(vec)
    assert (flat.get() == vec).all()


def test_target_modules_are_configurable():
    built = build_model(ModelConfig(source="gpt2"), PeftConfig(r=4, target_modules=["c_fc"]), "causal_lm", None, seed=0)
    names = [n for n, _ in FlatView(built.model).params]
    assert names and all(".mlp.c_fc." in n for n in names)


def test_local_path_model(tmp_path):
    """source=path: any transformers directory on disk (here: a tiny GPT-2 saved with its tokenizer)."""
    cfg = ModelConfig(source="gpt2")
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    _base_model(cfg, "causal_lm", None, tok).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    built = build_model(cfg, PeftConfig(r=4), "causal_lm", None, seed=0)
    local = build_model(ModelConfig(source="path", path=str(tmp_path / "m")), PeftConfig(r=4), "causal_lm", None, seed=0)
    assert FlatView(local.model).base_fingerprint() == FlatView(built.model).base_fingerprint()
    batch = local.tokenizer(["one two three"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(local.model(**batch, labels=batch["input_ids"]).loss)


def test_bad_local_path_is_one_line(tmp_path):
    with pytest.raises(HierfedError, match="model.path"):
        build_model(ModelConfig(source="path", path=str(tmp_path)), PeftConfig(), "causal_lm", None, seed=0)


def test_minilm_rejects_causal_data():
    with pytest.raises(HierfedError, match="minilm"):
        build_model(ModelConfig(source="minilm"), PeftConfig(), "causal_lm", None, seed=0)
