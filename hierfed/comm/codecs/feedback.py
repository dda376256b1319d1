"""Error feedback (Seide et al. 2014; Karimireddy et al. 2019): what compression dropped this round
is added to the next round's input, so over rounds every coordinate is eventually sent."""

from __future__ import annotations

import numpy as np

from hierfed.comm.codecs.chain import Codec
from hierfed.comm.codecs.sparse import RandK
from hierfed.errors import HierfedError


class ErrorFeedback:
    """One sender's residual r for one codec: encode(x) sends c = x + r and keeps r = c - decode.

    So x + r_old = decode(payload) + r_new (float32 arithmetic), and after T rounds
    sum(decoded) = sum(x) - r_T. The residual is sender state: checkpoint it with state_dict().
    """

    def __init__(self, codec: Codec, dim: int) -> None:
        if isinstance(codec.sparsifier, RandK) and codec.sparsifier.scaled:
            f = codec.sparsifier.spec.split(",")[0]
            raise HierfedError(
                f"error feedback with {codec.spec}: scaling kept values by dim/k makes the residual grow "
                f"every round; use '{f},scaled=false' or topk"
            )
        self.codec = codec
        self.dim = int(dim)
        self.residual = np.zeros(self.dim, dtype=np.float32)

    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The payload for x + residual; the residual becomes what this payload failed to carry."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape != (self.dim,):
            raise HierfedError(f"error feedback ({self.codec.spec}): vector of shape {x.shape}, expected ({self.dim},)")
        corrected = x + self.residual
        payload = self.codec.encode(corrected, rng)
        self.residual = corrected - self.codec.decode(payload, self.dim)
        return payload

    def reset(self) -> None:
        self.residual[...] = 0

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"residual": self.residual.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        r = np.asarray(state["residual"])
        if r.shape != (self.dim,):
            raise HierfedError(
                f"error feedback ({self.codec.spec}): checkpointed residual has shape {r.shape}, expected ({self.dim},)"
            )
        self.residual = r.astype(np.float32, copy=True)
