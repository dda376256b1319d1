"""Per-group evaluation (hierfed.training.evaluate) against numpy written here: cross-entropy per
example, accuracy, token-weighted NLL and perplexity, overall and per group."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from hierfed.training import Tokenized
from hierfed.training.evaluate import evaluate

V = 7  # vocabulary (LM) or classes


class TableModel(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]] (LM) or table[input_ids[b, 0]] (classification)."""

    def __init__(self, table: np.ndarray, lm: bool) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table, dtype=torch.float32))
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits if self.lm else logits[:, 0])


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_classification_per_group():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(V, V))
    ids = rng.integers(0, V, size=(11, 3))
    labels = rng.integers(0, V, size=11)
    groups = np.array([0, 1, 1, 0, 2, 2, 2, 0, 1, 0, 0])
    data = Tokenized(torch.tensor(ids), torch.ones(11, 3, dtype=torch.long), torch.tensor(labels))
    got = evaluate(TableModel(table, lm=False), data, "classification", 4, "cpu", groups, ("a", "b", "c"))
    lp = _log_softmax(table[ids[:, 0]])
    ce = -lp[np.arange(11), labels]
    right = lp.argmax(-1) == labels
    assert np.isclose(got["eval_loss"], ce.mean()) and np.isclose(got["eval_accuracy"], right.mean())
    assert set(got["groups"]) == {"a", "b", "c"}
    for g, name in enumerate("abc"):
        m = groups == g
        assert np.isclose(got["groups"][name]["eval_loss"], ce[m].mean())
        assert np.isclose(got["groups"][name]["eval_accuracy"], right[m].mean())
    assert "groups" not in evaluate(TableModel(table, lm=False), data, "classification", 4, "cpu")


def test_causal_lm_is_token_weighted_and_skips_padding():
    rng = np.random.default_rng(1)
    table = rng.normal(size=(V, V))
    ids = rng.integers(0, V, size=(5, 6))
    labels = ids.copy()
    lengths = [6, 2, 4, 6, 3]  # padded on the right; padding labelled -100
    for i, n in enumerate(lengths):
        labels[i, n:] = -100
    labels[3, :2] = -100  # a masked prompt: its tokens are no targets either
    groups = np.array([0, 1, 0, 1, 1])
    data = Tokenized(torch.tensor(ids), torch.tensor((labels != -100).astype(np.int64)), torch.tensor(labels))
    got = evaluate(TableModel(table, lm=True), data, "causal_lm", 2, "cpu", groups, ("en", "de"))
    nll, count = np.zeros(5), np.zeros(5)
    for i in range(5):
        lp = _log_softmax(table[ids[i]])
        for t in range(5):  # position t predicts token t + 1
            if labels[i, t + 1] != -100:
                nll[i] -= lp[t, labels[i, t + 1]]
                count[i] += 1
    assert count.tolist() == [5, 1, 3, 4, 2]  # targets 1..n-1, minus the masked prompt of row 3
    assert np.isclose(got["eval_loss"], nll.sum() / count.sum())
    assert np.isclose(got["eval_perplexity"], math.exp(nll.sum() / count.sum()))
    for g, name in enumerate(("en", "de")):
        m = groups == g
        assert np.isclose(got["groups"][name]["eval_loss"], nll[m].sum() / count[m].sum())
        assert np.isclose(got["groups"][name]["eval_perplexity"], math.exp(nll[m].sum() / count[m].sum()))
        assert "eval_accuracy" not in got["groups"][name]
