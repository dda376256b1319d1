"""What each trained client did in an edge round, for the simulated clock (hierfed.sim.clock): its
local steps, their modelled FLOPs (hierfed.sim.flops), its measured seconds and its share of its
rank's uplink bytes; a device's clients also the L2 norm of the update they sent (before DP clipping
and codecs: what `privacy.clip` or a normclip rule's `clip_norm` is chosen from). Devices put these
in their telemetry; edges (and a flat cloud) in their rows."""

from __future__ import annotations

from typing import Any

from hierfed.sim.flops import step_flops


class StepCost:
    """The FLOPs of a client's local steps on this rank's model. `whole`: for a split device, the
    whole model (its meta skeleton): the blocks it does not hold run on its edge (`edge_flops`)."""

    def __init__(self, model, cfg, whole=None) -> None:
        from hierfed.model.cost import step_shape  # torch: only ranks that hold a model get here

        self.part = step_shape(model)
        self.upper = None if whole is None else step_shape(whole) - self.part
        self.optimizer = cfg.train.optimizer
        self.batch = cfg.train.batch_size

    def work(self, client: int, data, steps: int, seconds: float) -> dict[str, Any]:
        """A client's `steps` local steps on `data` (batches of min(batch_size, examples) sequences,
        padded to the client's longest example) that took `seconds` here."""
        b, t = min(self.batch, len(data)), int(data.input_ids.shape[1])
        out: dict[str, Any] = {"client": int(client), "steps": steps, "flops": steps * step_flops(self.part, b, t, self.optimizer),
                               "seconds": seconds}
        if self.upper is not None:
            out["edge_flops"] = steps * step_flops(self.upper, b, t, self.optimizer)
        return out


def share_of_uplink(work: list[dict[str, Any]], sent: dict[tuple[str, str, str], int]) -> None:
    """Each client's `up`: an even share of what its rank sent upward this round (the ledger's
    counts: payloads, control, a split device's activations)."""
    up = sum(n for (_, direction, kind), n in sent.items() if direction == "up" and kind != "raw")
    for w in work:
        w["up"] = up / len(work)
