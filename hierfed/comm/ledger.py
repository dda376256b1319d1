"""Counts every byte that crosses a tier, where it is sent.

Bytes are counted per logical link as the link model sees them: a broadcast from an edge to its
three devices puts three copies on the edge->device links, whatever tree MPI uses underneath.
Kinds: "payload" (model parameters/updates, encoded, with their per-message metadata),
"activation"/"gradient" (what crosses a split device's cut, with its mask and labels), "control"
(small pickled protocol messages) and "raw": what the payloads would have been as plain float32 —
kept beside the real counts so a run reports what compression saved.
Telemetry (metrics sent to the cloud for logging) is not training traffic and is not counted.
"""

from __future__ import annotations

from collections import defaultdict

Key = tuple[str, str, str]  # (link, direction, kind), e.g. ("device-edge", "up", "payload")


class Ledger:
    def __init__(self) -> None:
        self._round: dict[Key, int] = defaultdict(int)
        self._total: dict[Key, int] = defaultdict(int)

    def record(self, link: str, direction: str, nbytes: int, kind: str = "payload", raw: int | None = None) -> None:
        """Count `nbytes` sent; for payloads also `raw`, their uncompressed float32 size (default: the same)."""
        self._add((link, direction, kind), nbytes)
        if kind != "control":
            self._add((link, direction, "raw"), nbytes if raw is None else raw)

    def _add(self, key: Key, n: int) -> None:
        self._round[key] += int(n)
        self._total[key] += int(n)

    def take_round(self) -> dict[Key, int]:
        """The bytes counted since the last call (one cloud round), and start a new round."""
        out, self._round = dict(self._round), defaultdict(int)
        return out

    @property
    def total(self) -> dict[Key, int]:
        return dict(self._total)


def merge(counts: list[dict[Key, int]]) -> dict[Key, int]:
    out: dict[Key, int] = defaultdict(int)
    for c in counts:
        for k, v in c.items():
            out[k] += v
    return dict(out)


def by_link(counts: dict[Key, int], raw: bool = False, only: str | None = None) -> dict[str, dict[str, int]]:
    """{(link, dir, kind): n} -> {"device-edge": {"up": n, "down": n}}: bytes sent (all kinds), or
    with raw=True what they would have been uncompressed (raw + control); `only`: that kind's alone."""
    out: dict[str, dict[str, int]] = {}
    for (link, direction, kind), n in sorted(counts.items()):
        if only is not None and kind != only:
            continue
        if only is None and (kind == "raw") != raw and kind != "control":
            continue
        out.setdefault(link, {"up": 0, "down": 0})[direction] += n
    return out
