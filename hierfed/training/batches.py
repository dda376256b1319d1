"""A client's examples tokenised once into padded tensors, and the batches drawn from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hierfed.data import Example


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


def tokenize(tokenizer, examples: Sequence[Example], kind: str, max_length: int) -> Tokenized:
    if kind == "causal_lm" and examples and examples[0].messages is not None:  # instruction tuning: loss on responses
        from hierfed.training.instruct import tokenize_conversations

        return Tokenized(*tokenize_conversations(tokenizer, examples, max_length))
    # Padded to the longest example of the set (at most max_length): short texts cost short steps.
    enc = tokenizer([e.text for e in examples], padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    if kind == "classification":
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    else:
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100  # no loss on padding
    return Tokenized(enc["input_ids"], enc["attention_mask"], labels)
