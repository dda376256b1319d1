"""The flat view of what trains: a model's trainable parameters as one float32 vector.

Only this vector travels between ranks (as a bare MPI buffer); its layout (names and shapes, in a
fixed order) is agreed once at start-up through `fingerprint`, and `base_hashes` lets every rank
check that it trains on top of the same frozen weights.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


class FlatView:
    """The trainable parameters of a model as one contiguous float32 vector (names in a fixed order)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.sizes = [p.numel() for _, p in self.params]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.dim = int(self.offsets[-1])

    def manifest(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, tuple(p.shape)) for n, p in self.params]

    def fingerprint(self) -> str:
        """Names and shapes: ranks agree on it once at start-up, then exchange bare buffers."""
        return hashlib.blake2b(repr(self.manifest()).encode(), digest_size=8).hexdigest()

    def base_hashes(self) -> dict[str, str]:
        """A hash of every frozen weight by name: every rank must train on top of the same base
        model, and a rank holding part of it (split placement) checks the part it holds."""
        out = {}
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                data = p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
                out[n] = hashlib.blake2b(data, digest_size=8).hexdigest()
        return out

    def get(self, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(self.dim, dtype=np.float32) if out is None else out
        with torch.no_grad():
            for (_, p), a, b in zip(self.params, self.offsets[:-1], self.offsets[1:]):
                out[a:b] = p.detach().reshape(-1).to("cpu", torch.float32).numpy()
        return out

    def set(self, vec: np.ndarray) -> None:
        if vec.size != self.dim:
            raise ValueError(f"flat vector has {vec.size} values, the model's trainable parameters {self.dim}")
        src = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32))
        with torch.no_grad():
            for (_, p), a, b in zip(self.params, self.offsets[:-1], self.offsets[1:]):
                p.copy_(src[a:b].view_as(p))  # copy_ moves to p's device and dtype

    def state_dict(self, vec: np.ndarray) -> dict[str, torch.Tensor]:
        """The vector as named tensors (for safetensors checkpoints)."""
        return {n: torch.from_numpy(vec[a:b].copy()).view(p.shape) for (n, p), a, b in zip(self.params, self.offsets[:-1], self.offsets[1:])}
