"""The local training step: tau1 optimiser steps of one client on its shard, and evaluation.

Clients are stateless between edge rounds (a fresh optimiser each time, as in FedAvg), and every
source of randomness is seeded from (seed, round, edge round, client), so a run is reproducible
and a resumed run continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import numpy as np
import torch

from hierfed.config import TrainConfig
from hierfed.strategy.client import LocalTerm
from hierfed.training.batches import Tokenized
from hierfed.training.evaluate import evaluate


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def grad_term(term: LocalTerm, params: list[torch.nn.Parameter]):
    """A function that adds `term` to the gradients of `params` (after backward, before clipping):
    mu · (p − p_start) for the proximal term μ/2‖w − w_start‖² (p_start: the parameters now, when
    training starts), and the flat `correction` split over the parameters in their FlatView order."""
    anchors = None if term.mu is None else [p.detach().clone() for p in params]
    parts = None
    if term.correction is not None:
        flat, parts, at = torch.from_numpy(np.ascontiguousarray(term.correction, dtype=np.float32)), [], 0
        for p in params:
            parts.append(flat[at : at + p.numel()].view_as(p).to(p.device, p.dtype))
            at += p.numel()

    def add() -> None:
        with torch.no_grad():
            for i, p in enumerate(params):
                if p.grad is None:  # not reached by the loss: it has not moved, its proximal gradient is 0
                    if parts is None:
                        continue
                    p.grad = torch.zeros_like(p)
                if anchors is not None:
                    p.grad.add_(p.detach() - anchors[i], alpha=term.mu)
                if parts is not None:
                    p.grad.add_(parts[i])

    return add


class LocalTrainer:
    """Runs a client's local steps on the model whose trainable parameters the FlatView exposes."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.device = next(model.parameters()).device

    def train(self, data: Tokenized, steps: int, seed: int, term: LocalTerm | None = None) -> tuple[float, int]:
        """`steps` optimiser steps on random batches of `data`; returns (mean loss, samples seen).
        `term`: what the client algorithm adds to every gradient (FedProx, SCAFFOLD; `grad_term`);
        the loss reported is the task's alone."""
        torch.manual_seed(seed)  # dropout
        rng = np.random.default_rng(seed)  # batch order
        opt = make_optimizer(self.trainable, self.cfg)
        bs = min(self.cfg.batch_size, len(data))
        self.model.train()
        add_term = None if term is None else grad_term(term, self.trainable)
        total = 0.0
        for _ in range(steps):
            idx = rng.choice(len(data), size=bs, replace=False)
            loss = self.model(**data.batch(idx, self.device)).loss
            loss.backward()
            if add_term is not None:
                add_term()
            if self.cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += float(loss.detach())
        return total / steps, steps * bs

    def evaluate(self, data: Tokenized, kind: str, batch_size: int, groups: np.ndarray | None = None,
                 names: tuple[str, ...] | None = None) -> dict:
        """Eval loss, and accuracy (classification) or perplexity (causal LM); per group as well when
        each example's group index and the group names are given (hierfed.training.evaluate)."""
        return evaluate(self.model, data, kind, batch_size, self.device, groups, names)


def optimizer_arrays(opt: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """A torch optimiser's per-parameter state as named arrays (for npz checkpoints)."""
    out = {}
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{idx}/{key}"] = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
    return out


def load_optimizer_arrays(opt: torch.optim.Optimizer, arrays: dict[str, np.ndarray]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in arrays.items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = torch.from_numpy(np.array(value))
    sd["state"] = state
    opt.load_state_dict(sd)  # moves state to the parameters' device
