"""Split placement: DeviceStage -> wire -> EdgeStage computes the whole model's loss and gradients."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hierfed.config import ModelConfig, PeftConfig
from hierfed.data.schema import Example
from hierfed.errors import HierfedError
from hierfed.model import FlatView, build_model
from hierfed.model.cut import DeviceStage, EdgeStage, num_blocks, prune_for_device, prune_for_edge, side_of, split_model
from hierfed.training import tokenize

TOL = 1e-6
TEXTS = ["the cat sat", "a much longer sentence about federated learning at the edge", "hi", "split models train too"]
CASES = [("gpt2", "classification"), ("gpt2", "causal_lm"), ("llama", "classification"), ("llama", "causal_lm"), ("minilm", "classification")]
MODEL_TYPE = {"gpt2": "gpt2", "llama": "llama", "minilm": "bert"}


def build(source: str, kind: str, size: str = "tiny"):
    """A seeded model in eval mode whose adapters and heads are randomised (LoRA B starts at 0)."""
    built = build_model(ModelConfig(source=source, size=size), PeftConfig(r=4, dropout=0.0), kind, 3 if kind == "classification" else None, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in built.model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    built.model.eval()  # MiniLM has dropout 0.1; eval makes the comparison deterministic
    data = tokenize(built.tokenizer, [Example(t, label=i % 3) for i, t in enumerate(TEXTS)], kind, max_length=16)
    return built.model, {"input_ids": data.input_ids, "attention_mask": data.attention_mask, "labels": data.labels}


def cuts(model) -> list[int]:
    return sorted({1, num_blocks(model) - 1})


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def whole_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in trainable(model).items()}


def split_grads(model, kind, k, batch, perturb: float = 0.0):
    """Simulates the wire: the edge gets a detached copy, the device gets the edge's gradient back."""
    model.zero_grad(set_to_none=True)
    device, edge = split_model(model, kind, k)
    hidden = device(batch["input_ids"], batch["attention_mask"])
    wire = hidden.detach().requires_grad_()
    loss, logits = edge(wire, batch["attention_mask"], batch["labels"])
    loss.backward()
    grad = wire.grad.clone()
    grad.view(-1)[0] += perturb
    hidden.backward(grad)
    return loss, logits, {n: p.grad.clone() for n, p in trainable(model).items() if p.grad is not None}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("source,kind", CASES)
def test_split_equals_whole_loss_and_gradients(source, kind):
    model, batch = build(source, kind)
    out, want = whole_grads(model, batch)
    assert all(float(g.abs().max()) > 0 for g in want.values())  # every adapter and head is exercised
    for k in cuts(model):
        loss, logits, got = split_grads(model, kind, k, batch)
        assert abs(loss.item() - out.loss.item()) <= TOL, (k, loss.item(), out.loss.item())
        assert logits.shape == out.logits.shape and float((logits - out.logits).detach().abs().max()) <= TOL
        assert max_diff(got, want) <= TOL, k


@pytest.mark.parametrize("source,kind", [("gpt2", "classification"), ("llama", "causal_lm")])
def test_every_cut_of_a_deeper_model(source, kind):
    model, batch = build(source, kind, size="small")  # 4 blocks: cuts with several blocks on each side
    out, want = whole_grads(model, batch)
    for k in range(1, num_blocks(model)):
        loss, _, got = split_grads(model, kind, k, batch)
        assert abs(loss.item() - out.loss.item()) <= TOL and max_diff(got, want) <= TOL, k


@pytest.mark.parametrize("source,kind", [("gpt2", "causal_lm"), ("minilm", "classification")])
def test_dropout_in_train_mode_draws_in_the_same_order(source, kind):
    # In one process the split consumes the RNG exactly as the whole model does (same dropout masks).
    model, batch = build(source, kind)
    model.train()
    torch.manual_seed(5)
    out, want = whole_grads(model, batch)
    torch.manual_seed(5)
    loss, _, got = split_grads(model, kind, 1, batch)
    assert abs(loss.item() - out.loss.item()) <= TOL and max_diff(got, want) <= TOL


@pytest.mark.parametrize("source,kind", [("gpt2", "classification"), ("llama", "causal_lm"), ("minilm", "classification")])
def test_perturbed_boundary_gradient_is_detected(source, kind):
    model, batch = build(source, kind)
    _, want = whole_grads(model, batch)
    k = cuts(model)[-1]
    _, _, got = split_grads(model, kind, k, batch, perturb=1e-3)
    device = [n for n in want if side_of(n, MODEL_TYPE[source], k) == "device"]
    edge = [n for n in want if n not in device]
    assert max_diff({n: got[n] for n in device}, {n: want[n] for n in device}) > TOL
    assert max_diff({n: got[n] for n in edge}, {n: want[n] for n in edge}) <= TOL  # the edge did its part right


@pytest.mark.parametrize("source,kind", CASES)
def test_side_of_matches_the_stages(source, kind):
    model, batch = build(source, kind)
    mt = MODEL_TYPE[source]
    names = {id(p): n for n, p in model.named_parameters()}
    params = trainable(model)
    for k in cuts(model):
        sides = {n: side_of(n, mt, k) for n in params}
        device, edge = split_model(model, kind, k)
        on_device = {names[id(p)] for p in device.parameters() if p.requires_grad}
        on_edge = {names[id(p)] for p in edge.parameters() if p.requires_grad}
        assert on_device == {n for n, s in sides.items() if s == "device"}
        assert on_edge == {n for n, s in sides.items() if s == "edge"}
        assert on_device and on_edge and not on_device & on_edge
        # "used by" measured, not declared: the edge's backward reaches only edge parameters.
        model.zero_grad(set_to_none=True)
        hidden = device(batch["input_ids"], batch["attention_mask"])
        wire = hidden.detach().requires_grad_()
        edge(wire, batch["attention_mask"], batch["labels"])[0].backward()
        assert {n for n, p in params.items() if p.grad is not None} == on_edge
        hidden.backward(wire.grad)
        assert {n for n, p in params.items() if p.grad is not None} == set(params)


def test_side_of_names():
    assert side_of("base_model.model.transformer.h.3.attn.c_attn.lora_A.default.weight", "gpt2", 4) == "device"
    assert side_of("base_model.model.transformer.h.4.attn.c_attn.lora_A.default.weight", "gpt2", 4) == "edge"
    assert side_of("base_model.model.score.modules_to_save.default.weight", "gpt2", 1) == "edge"
    assert side_of("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight", "llama", 1) == "device"
    assert side_of("base_model.model.model.norm.weight", "llama", 1) == "edge"
    assert side_of("base_model.model.model.embed_tokens.weight", "llama", 1) == "device"
    assert side_of("base_model.model.classifier.modules_to_save.default.bias", "bert", 2) == "edge"
    assert side_of("base_model.model.bert.encoder.layer.10.attention.self.value.lora_A.default.weight", "bert", 2) == "edge"
    assert side_of("base_model.model.bert.embeddings.word_embeddings.weight", "bert", 2) == "device"
    with pytest.raises(ValueError):
        side_of("base_model.model.something_else.weight", "gpt2", 1)
    with pytest.raises(HierfedError, match="supports gpt2, llama and bert models; got t5"):
        side_of("x", "t5", 1)


def test_classifier_pooling_refuses_a_text_ending_in_the_pad_token():
    # HF pools the rightmost token != pad_token_id; the edge sees only the mask, so the device checks they agree.
    model, batch = build("gpt2", "classification")
    ids = batch["input_ids"].clone()
    ids[0, int(batch["attention_mask"][0].sum()) - 1] = model.get_base_model().config.pad_token_id
    device, _ = split_model(model, "classification", 1)
    with pytest.raises(HierfedError, match="pad token"):
        device(ids, batch["attention_mask"])


def test_bad_model_and_cut_are_rejected():
    with pytest.raises(HierfedError, match="got t5"):
        split_model(SimpleNamespace(config=SimpleNamespace(model_type="t5")), "classification", 1)
    with pytest.raises(HierfedError, match="needs a transformers model"):  # a gpt2 config on something else
        split_model(SimpleNamespace(config=SimpleNamespace(model_type="gpt2")), "classification", 1)
    model, _ = build("gpt2", "classification")
    for k in (0, num_blocks(model)):
        with pytest.raises(HierfedError, match="split_layers"):
            split_model(model, "classification", k)


@pytest.mark.parametrize("source,kind", [("gpt2", "causal_lm"), ("llama", "classification"), ("minilm", "classification")])
def test_pruned_stages_compute_what_the_whole_model_does(source, kind):
    whole, batch = build(source, kind)
    k = cuts(whole)[-1]
    device_full, edge_full = split_model(whole, kind, k)
    with torch.no_grad():
        hidden = device_full(batch["input_ids"], batch["attention_mask"])
        want_loss, want_logits = edge_full(hidden, batch["attention_mask"], batch["labels"])

    on_device, _ = build(source, kind)
    prune_for_device(on_device, k)
    on_edge, _ = build(source, kind)
    prune_for_edge(on_edge, k)
    with torch.no_grad():
        got_hidden = DeviceStage(on_device, k)(batch["input_ids"], batch["attention_mask"])
        got_loss, got_logits = EdgeStage(on_edge, kind, k)(hidden, batch["attention_mask"], batch["labels"])
    assert torch.equal(got_hidden, hidden)
    assert torch.equal(got_loss, want_loss) and torch.equal(got_logits, want_logits)

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(on_device) < count(whole) and count(on_edge) < count(whole)
    # Names stay those of the whole model: each side's FlatView is its part of the global one, in order.
    mt = MODEL_TYPE[source]
    full = [n for n, _ in FlatView(whole).manifest()]
    assert [n for n, _ in FlatView(on_device).manifest()] == [n for n in full if side_of(n, mt, k) == "device"]
    assert [n for n, _ in FlatView(on_edge).manifest()] == [n for n in full if side_of(n, mt, k) == "edge"]
    if source == "gpt2":  # the tied LM head matrix stays on the edge
        assert on_edge.get_base_model().lm_head.weight.shape == whole.get_base_model().transformer.wte.weight.shape
    with pytest.raises(ValueError, match="pruned"):
        EdgeStage(on_device, kind, k)
    with pytest.raises(RuntimeError, match="pruned"):
        on_device(**batch)


def test_phases_charge_each_lap_to_the_named_phase():
    import time

    from hierfed.placement.link import Phases

    ph = Phases(torch.device("cpu"), sync=True)  # sync is a no-op off the GPU
    ph.start()
    time.sleep(0.02)
    ph.mark("compute")
    ph.mark("encode")  # an empty lap
    time.sleep(0.01)
    ph.mark("compute")
    got = ph.take()
    assert set(got) == {"compute", "encode"}
    assert 0.03 <= got["compute"] < 0.5 and got["encode"] < got["compute"]
    assert ph.take() == {}  # taken: the next edge round starts from zero
