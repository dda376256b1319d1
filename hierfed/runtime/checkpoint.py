"""Cloud checkpoints: the global adapter in PEFT's own format plus the round state, written atomically.

Layout under <out>/checkpoints/:
  round-0003/adapter_model.safetensors, adapter_config.json   PeftModel.from_pretrained(base, this dir)
                                  (peft.method none: the whole model, from_pretrained(this dir))
  round-0003/state.npz     exact flat global vector and the cloud's strategy and link state (the resume source)
  round-0003/state.json    round, dim, fingerprint, seed
  latest                   the name of the newest complete checkpoint
A checkpoint is written into a temporary directory and renamed into place. It is complete only when
every rank has saved its own state of that round too (an edge's strategy state such as FedAvgM's
velocity, error-feedback residuals, a split device's or a ZeRO edge's optimiser: RankState below), which the cloud learns from the next message each rank
sends it (the next round's contributions, or the end-of-run gather): only then does `confirm` point
`latest` at it, atomically. A crash at any moment therefore leaves `latest` naming a checkpoint that
every rank can resume from, and `--resume` falls back to it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hierfed.errors import HierfedError


@dataclass
class State:
    round: int
    params: np.ndarray
    cloud_state: dict[str, np.ndarray] = field(default_factory=dict)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpoints:
    def __init__(self, root: Path, keep: int) -> None:
        self.root = root
        self.keep = keep

    def save(self, state: State, peft_model, flat, meta: dict) -> Path:
        """Write round `state.round`; `peft_model` is the cloud's model, loaded with the global params.
        `latest` does not move until `confirm(round)`: the other ranks may still be saving theirs."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"round-{state.round:04d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        flat.set(state.params)
        peft_model.save_pretrained(str(tmp))
        arrays = {"params": state.params}
        arrays.update({f"cloud/{k}": v for k, v in state.cloud_state.items()})
        np.savez(tmp / "state.npz", **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle's bool
        (tmp / "state.json").write_text(json.dumps({"round": state.round, "dim": int(state.params.size), **meta}, indent=2))
        if final.exists():  # re-saving a round: move the old one aside, so `latest` never names a gap
            aside = self.root / f".old-{name}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        return final

    def confirm(self, round_: int) -> None:
        """Every rank has saved round `round_`: point `latest` at it, keep the newest `keep` complete
        checkpoints (and any newer, not yet confirmed one), drop leftovers of crashed writes."""
        name = f"round-{round_:04d}"
        if not (self.root / name / "state.npz").exists():
            raise HierfedError(f"checkpoint {self.root / name} was never written")
        _write_text_atomic(self.root / "latest", name + "\n")
        done = sorted((p for p in self.root.glob("round-*") if p.is_dir() and int(p.name.split("-")[1]) <= round_),
                      key=lambda p: int(p.name.split("-")[1]))
        stale = [p for p in self.root.glob(".*-round-*") if p.is_dir()]
        for old in done[: -self.keep] + stale:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        marker = self.root / "latest"
        if not marker.exists():
            return None
        return self.root / marker.read_text().strip()

    def load_latest(self, dim: int, fingerprint: str) -> State:
        path = self.latest()
        if path is None or not (path / "state.npz").exists():
            raise HierfedError(f"--resume: no checkpoint under {self.root}")
        meta = json.loads((path / "state.json").read_text())
        if meta.get("dim") != dim or meta.get("fingerprint") != fingerprint:
            raise HierfedError(f"--resume: {path} holds a different model's adapter ({meta.get('dim')} values, this run has {dim})")
        with np.load(path / "state.npz") as z:
            arrays = {k: z[k] for k in z.files}
        cloud = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("cloud/")}
        return State(round=int(meta["round"]), params=arrays["params"], cloud_state=cloud)


class RankState:
    """State that lives on a sender rank (error-feedback residuals of its clients; an edge's strategy
    state, residuals and held copies), saved by that rank beside the cloud's checkpoints: checkpoints/ranks/round-NNNN/<rank>.npz.

    The cloud's `latest` decides which round a resume starts from; every rank then loads its own
    file of that round. A rank keeps one more round than the cloud, so the round `latest` names is
    always still there. Assumes the run directory is shared by all ranks (as on a cluster).
    """

    def __init__(self, out: Path, rank: int, keep: int) -> None:
        self.root = out / "checkpoints" / "ranks"
        self.rank = rank
        self.keep = keep + 1

    def _path(self, round_: int) -> Path:
        return self.root / f"round-{round_:04d}" / f"rank-{self.rank:05d}.npz"

    def save(self, round_: int, state: dict[str, np.ndarray]) -> None:
        path = self._path(round_)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **state)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle's bool
        os.replace(tmp, path)
        mine = sorted(self.root.glob(f"round-*/rank-{self.rank:05d}.npz"), key=lambda p: int(p.parent.name.split("-")[1]))
        for old in mine[: -self.keep]:
            old.unlink(missing_ok=True)

    def load(self, round_: int) -> dict[str, np.ndarray]:
        path = self._path(round_)
        if not path.exists():
            raise HierfedError(f"--resume: {path} is missing (this rank's error-feedback state of round {round_})")
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
