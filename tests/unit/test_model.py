"""Models: every source builds offline, PEFT methods apply, the flat view covers exactly what trains."""

from __future__ import annotations

import pytest
import torch
import transformers

from hierfed.config import ModelConfig, PeftConfig
from hierfed.errors import HierfedError
from hierfed.model import FlatView, build_model, load_tokenizer, minilm_path
from hierfed.model.build import _base_model


@pytest.mark.parametrize("source", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["classification", "causal_lm"])
def test_config_built_models_are_seeded_and_identical(source, kind):
    a = build_model(ModelConfig(source=source), PeftConfig(r=4), kind, 4 if kind == "classification" else None, seed=3)
    b = build_model(ModelConfig(source=source), PeftConfig(r=4), kind, 4 if kind == "classification" else None, seed=3)
    fa, fb = FlatView(a.model), FlatView(b.model)
    assert fa.base_hashes() == fb.base_hashes()
    assert fa.fingerprint() == fb.fingerprint()
    assert (fa.get() == fb.get()).all()
    c = build_model(ModelConfig(source=source), PeftConfig(r=4), kind, 4 if kind == "classification" else None, seed=4)
    assert FlatView(c.model).base_hashes() != fa.base_hashes()


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
    assert FlatView(local.model).base_hashes() == FlatView(built.model).base_hashes()
    batch = local.tokenizer(["one two three"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(local.model(**batch, labels=batch["input_ids"]).loss)


def test_bad_local_path_is_one_line(tmp_path):
    with pytest.raises(HierfedError, match="model.path"):
        build_model(ModelConfig(source="path", path=str(tmp_path)), PeftConfig(), "causal_lm", None, seed=0)


def test_minilm_rejects_causal_data():
    with pytest.raises(HierfedError, match="minilm"):
        build_model(ModelConfig(source="minilm"), PeftConfig(), "causal_lm", None, seed=0)


def _saved_llama(tmp_path, kind: str, num_labels: int | None, layers: int = 4) -> ModelConfig:
    """A tiny Llama of `layers` blocks saved to disk (weights and MiniLM's tokenizer): source=path."""
    cfg = ModelConfig(source="llama", config_overrides={"num_hidden_layers": layers})
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    _base_model(cfg, kind, num_labels, tok).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return ModelConfig(source="path", path=str(tmp_path / "m"))


def _frozen(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("source, kind, num_labels", [("path", "causal_lm", None), ("minilm", "classification", 4)])
def test_split_device_loads_only_its_blocks_from_disk(tmp_path, source, kind, num_labels):
    """blocks=k with weights on disk: embeddings and blocks [0, k) loaded (equal to the whole model's,
    same names), the later blocks placeholders that hold nothing; after pruning it is exactly the
    whole model pruned, and the cloud's per-weight hashes accept it."""
    from hierfed.model.build import _load_first_blocks
    from hierfed.model.cut import Pruned, num_blocks, prune_for_device
    from hierfed.placement.memory import skeleton
    from hierfed.roles.protocol import Plan, check_plan

    mcfg = _saved_llama(tmp_path, kind, num_labels) if source == "path" else ModelConfig(source="minilm")
    path = mcfg.path if source == "path" else minilm_path()
    auto = transformers.AutoModelForSequenceClassification if kind == "classification" else transformers.AutoModelForCausalLM
    loaded = _load_first_blocks(auto, path, {"num_labels": num_labels} if num_labels else {}, 2)
    n = num_blocks(loaded)
    assert n >= 4 and loaded.config.num_hidden_layers == n
    pruned = [m for m in loaded.modules() if isinstance(m, Pruned)]
    assert len(pruned) == n - 2 and all(not list(m.parameters()) for m in pruned)
    whole = build_model(mcfg, PeftConfig(r=4), kind, num_labels, seed=0)
    later = {name for name, _ in whole.model.get_base_model().named_parameters()
             if any(f"layer.{i}." in name or f"layers.{i}." in name for i in range(2, n))}
    assert later and not later & {name for name, _ in loaded.named_parameters()}  # blocks 2.. were never loaded
    part = build_model(mcfg, PeftConfig(r=4), kind, num_labels, seed=0, blocks=2)
    assert (whole.blocks, part.blocks) == (None, 2)
    prune_for_device(whole.model, 2)
    a, b = _frozen(whole.model), _frozen(part.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [n for n, p in whole.model.named_parameters() if p.requires_grad] == [n for n, p in part.model.named_parameters() if p.requires_grad]
    # the layout that travels comes from the meta skeleton: the whole model's
    from hierfed.config import RunConfig

    rc = RunConfig(model=mcfg, peft=PeftConfig(r=4))
    full = build_model(mcfg, PeftConfig(r=4), kind, num_labels, seed=0)
    layout = FlatView(skeleton(rc, kind, num_labels))
    assert (layout.dim, layout.fingerprint()) == (FlatView(full.model).dim, FlatView(full.model).fingerprint())
    plan = Plan(1, layout.dim, layout.fingerprint(), FlatView(full.model).base_hashes(), str(tmp_path))
    check_plan(plan, layout.dim, layout.fingerprint(), FlatView(part.model).base_hashes(), "edge0/d0", part=True)


def test_split_device_part_of_a_config_built_model():
    """blocks=k with seeded weights: built whole (same random weights as every rank), pruned to
    the embeddings and blocks [0, k) before it moves to its device."""
    from hierfed.model.cut import Pruned, prune_for_device

    whole = build_model(ModelConfig(source="gpt2"), PeftConfig(r=4), "causal_lm", None, seed=1)
    part = build_model(ModelConfig(source="gpt2"), PeftConfig(r=4), "causal_lm", None, seed=1, blocks=1)
    assert isinstance(part.model.get_base_model().transformer.h[1], Pruned)
    prune_for_device(whole.model, 1)
    a, b = _frozen(whole.model), _frozen(part.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (FlatView(part.model).get() == FlatView(whole.model).get()).all()  # adapters too: the same RNG stream


def test_check_plan_names_the_frozen_weight_that_differs():
    from hierfed.roles.protocol import Plan, check_plan

    plan = Plan(1, 10, "f", {"a.weight": "1", "b.weight": "2"}, "/tmp")
    check_plan(plan, 10, "f", {"b.weight": "2"}, "edge0/d0", part=True)  # a split device's part: fine
    check_plan(plan, 10, "f", {"a.weight": "1", "b.weight": "2"}, "edge0/d1")
    with pytest.raises(HierfedError, match=r"edge0/d1: frozen base weight a.weight of the cloud's model is missing here"):
        check_plan(plan, 10, "f", {"b.weight": "2"}, "edge0/d1")  # a whole-model rank must hold them all
    with pytest.raises(HierfedError, match=r"edge0/d0: frozen base weight b.weight differs from the cloud's model"):
        check_plan(plan, 10, "f", {"a.weight": "1", "b.weight": "3"}, "edge0/d0")
    with pytest.raises(HierfedError, match=r"frozen base weight c.weight is not in the cloud's model"):
        check_plan(plan, 10, "f", {"c.weight": "1"}, "edge0/d0", part=True)
    with pytest.raises(HierfedError, match=r"trainable parameters differ from the cloud's \(11 values vs 10\)"):
        check_plan(plan, 11, "f", {}, "edge0/d0")


def test_global_index_checks_names_and_shapes():
    """A split rank's parameters are placed in the whole model's vector by name; a name or shape
    the whole layout lacks is one clear error, not a misplaced slice."""
    from hierfed.model.cut import prune_for_device
    from hierfed.placement.link import global_index

    whole = build_model(ModelConfig(source="llama"), PeftConfig(r=4), "causal_lm", None, seed=0)
    part = build_model(ModelConfig(source="llama"), PeftConfig(r=4), "causal_lm", None, seed=0, blocks=1)
    w, p = FlatView(whole.model), FlatView(part.model)
    idx = global_index(w, p)
    assert (w.get()[idx] == p.get()).all() and len(idx) == p.dim < w.dim
    other = build_model(ModelConfig(source="llama"), PeftConfig(r=8), "causal_lm", None, seed=0)
    prune_for_device(other.model, 1)
    with pytest.raises(HierfedError, match=r"split placement: trainable parameter .*lora_A.* \[8, 64\]: the whole model's layout has shape \[4, 64\]"):
        global_index(w, FlatView(other.model))
