"""Device behaviour drawn from the topology: is a client reachable, does it vanish mid-round.

Every draw is a pure function of (seed, cloud round, edge round or attempt, client, what is
drawn): a `numpy.random.SeedSequence` of those integers seeds a fresh generator, so every rank
computes the same outcome with no message, a re-run draws the same, and a resumed run continues
exactly (nothing about behaviour is state). The probabilities come from the client's device group
or class (`availability`, `dropout`, `diurnal` in the topology; hierfed.topology.Behaviour):

    P(reachable in cloud round t) = availability x (1 - amplitude (1 - cos 2pi(t / period - phase)) / 2)
    P(vanishes after starting)    = dropout

A diurnal pattern peaks (the full `availability`) at t = phase x period and bottoms out at
availability x (1 - amplitude) half a period later; groups with different phases are devices in
different time zones. Pure: numpy only.
"""

from __future__ import annotations

import math

import numpy as np

from hierfed.topology import Behaviour

# what is drawn: the last word of each draw's seed sequence, so the draws are independent
AVAILABLE, DROPOUT = 0xA7A1, 0xD809
_MASK = (1 << 63) - 1


def uniform(seed: int, t: int, s: int, client: int, what: int) -> float:
    """A uniform draw in [0, 1) fixed by (seed, cloud round t, edge round or attempt s, client, what)."""
    words = [int(seed) & _MASK, int(t), int(s), int(client), int(what)]
    return float(np.random.default_rng(np.random.SeedSequence(words)).random())


def availability(b: Behaviour, t: int) -> float:
    """The probability that a client of behaviour `b` is reachable in cloud round t."""
    if b.period is None or b.amplitude == 0.0:
        return b.availability
    dip = (1.0 - math.cos(2.0 * math.pi * (t / b.period - b.phase))) / 2.0  # 0 at the peak, 1 at the trough
    return b.availability * (1.0 - b.amplitude * dip)


def is_available(b: Behaviour, seed: int, t: int, s: int, client: int) -> bool:
    """Reachable when sampled for edge round s of cloud round t (s = 0: for the whole cloud round)."""
    p = availability(b, t)
    return p >= 1.0 or (p > 0.0 and uniform(seed, t, s, client, AVAILABLE) < p)


def drops_out(b: Behaviour, seed: int, t: int, s: int, client: int) -> bool:
    """Vanishes after it started the work of edge round (or attempt) s: its update never arrives."""
    return b.dropout > 0.0 and (b.dropout >= 1.0 or uniform(seed, t, s, client, DROPOUT) < b.dropout)

