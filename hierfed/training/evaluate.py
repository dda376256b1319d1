"""Evaluation of the global model, overall and per group (a category shelf, a language, ...).

Every example's loss is summed once, so the overall and per-group numbers come from one pass:
classification reports the mean cross-entropy per example and the accuracy; causal LM the mean
negative log-likelihood per target token (padding and -100 labels excluded) and its exponential,
the perplexity. A group's numbers are the same formulas over its examples only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hierfed.training.batches import Tokenized


@torch.no_grad()
def per_example(model: torch.nn.Module, data: Tokenized, kind: str, batch_size: int,
                device: torch.device | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(loss sum, targets, correct) per example: classification has one target per example and
    `correct` 0/1; causal LM counts its next-token targets (labels shifted by one, -100 skipped)."""
    model.eval()
    n = len(data)
    loss, count, correct = np.zeros(n), np.zeros(n), np.zeros(n)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        batch = data.batch(idx, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"]
        if kind == "classification":
            loss[idx] = F.cross_entropy(logits, labels, reduction="none").cpu().numpy()
            count[idx] = 1
            correct[idx] = (logits.argmax(-1) == labels).cpu().numpy()
        else:  # token t predicts token t+1, as the model's own loss does
            logits, labels = logits[:, :-1], labels[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                  ignore_index=-100, reduction="none").view(labels.shape)
            loss[idx] = nll.sum(1).cpu().numpy()
            count[idx] = (labels != -100).sum(1).cpu().numpy()
    return loss, count, correct


def metrics(loss: np.ndarray, count: np.ndarray, correct: np.ndarray, kind: str) -> dict[str, float]:
    """eval_loss and eval_accuracy (classification) or eval_perplexity (causal LM) of these examples."""
    if kind == "classification":
        return {"eval_loss": float(loss.mean()), "eval_accuracy": float(correct.mean())}
    mean = float(loss.sum() / max(count.sum(), 1))
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 700.0))}


def evaluate(model: torch.nn.Module, data: Tokenized, kind: str, batch_size: int, device: torch.device | str,
             groups: np.ndarray | None = None, names: Sequence[str] | None = None) -> dict:
    """Overall metrics, plus "groups": {name: metrics} when each example's group index is given."""
    loss, count, correct = per_example(model, data, kind, batch_size, device)
    out: dict = metrics(loss, count, correct, kind)
    if groups is not None and names is not None:
        out["groups"] = {name: metrics(loss[groups == g], count[groups == g], correct[groups == g], kind)
                         for g, name in enumerate(names) if (groups == g).any()}
    return out
