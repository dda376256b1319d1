"""The local training step: tau1 optimiser steps of one client on its shard, and evaluation.

Clients are stateless between edge rounds (a fresh optimiser each time, as in FedAvg), and every
source of randomness is seeded from (seed, round, edge round, client), so a run is reproducible
and a resumed run continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from hierfed.config import TrainConfig
from hierfed.data import Example


def torch_device(name: str) -> torch.device:
    """"cpu", or a GPU for "cuda"/"auto": the rank's node-local index modulo the GPUs it sees."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from hierfed.errors import HierfedError

        raise HierfedError("runtime.device=cuda, but torch sees no GPU on this node")
    return torch.device("cuda", local_rank() % torch.cuda.device_count())


def local_rank() -> int:
    """This process's index among the ranks on its node, as the MPI launcher (or Slurm) says."""
    names = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK")
    return next((int(os.environ[v]) for v in names if v in os.environ), 0)


def configure_threads(threads: int) -> None:
    """Torch threads per rank: ranks usually outnumber cores, so one each by default."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (or parallel work has started): keep it
        pass


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


@dataclass
class Tokenized:
    """Examples tokenised once and padded to one length; labels are class ids or next-token targets."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, idx: np.ndarray, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        i = torch.from_numpy(idx)
        return {"input_ids": self.input_ids[i].to(device), "attention_mask": self.attention_mask[i].to(device), "labels": self.labels[i].to(device)}


def tokenize(tokenizer, examples: list[Example] | tuple[Example, ...], kind: str, max_length: int) -> Tokenized:
    # Padded to the longest example of the set (at most max_length): short texts cost short steps.
    enc = tokenizer([e.text for e in examples], padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    if kind == "classification":
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    else:
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100  # no loss on padding
    return Tokenized(enc["input_ids"], enc["attention_mask"], labels)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class LocalTrainer:
    """Runs a client's local steps on the model whose trainable parameters the FlatView exposes."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.device = next(model.parameters()).device

    def train(self, data: Tokenized, steps: int, seed: int) -> tuple[float, int]:
        """`steps` optimiser steps on random batches of `data`; returns (mean loss, samples seen)."""
        torch.manual_seed(seed)  # dropout
        rng = np.random.default_rng(seed)  # batch order
        opt = make_optimizer(self.trainable, self.cfg)
        bs = min(self.cfg.batch_size, len(data))
        self.model.train()
        total = 0.0
        for _ in range(steps):
            idx = rng.choice(len(data), size=bs, replace=False)
            loss = self.model(**data.batch(idx, self.device)).loss
            loss.backward()
            if self.cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += float(loss.detach())
        return total / steps, steps * bs

    @torch.no_grad()
    def evaluate(self, data: Tokenized, kind: str, batch_size: int) -> dict[str, float]:
        """Mean loss over the eval set, and accuracy for classification."""
        self.model.eval()
        loss_sum, correct, n = 0.0, 0, len(data)
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n))
            batch = data.batch(idx, self.device)
            out = self.model(**batch)
            loss_sum += float(out.loss) * len(idx)
            if kind == "classification":
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        metrics = {"eval_loss": loss_sum / n}
        if kind == "classification":
            metrics["eval_accuracy"] = correct / n
        return metrics


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
