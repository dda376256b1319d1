"""Secure aggregation (Bonawitz et al. 2017) in one process: exact cancellation against the plaintext
fixed-point sum, uniform-looking masked updates (chi-square), dropouts, corrupt shares, Shamir."""

from __future__ import annotations

import numpy as np
import pytest

from hierfed.privacy import shamir
from hierfed.privacy.ring import FixedPoint
from hierfed.privacy.secagg import Client, SecAggError, Server, threshold


def run(xs: dict[int, np.ndarray], drop: set[int] = frozenset(), fraction: float = 0.5, tamper=None, lie=None):
    """One aggregation: clients `xs` (uint32 vectors); `drop` leave after masking. `tamper(routed)`
    may alter routed ciphertexts; `lie(reveals)` revealed shares. Returns (server's sum, masked y's)."""
    tag = b"t1/s1/e0"
    clients = {c: Client(c, tag) for c in xs}
    server = Server(tag, fraction)
    adverts = server.collect_adverts({c: cl.advertise() for c, cl in clients.items()})
    sealed, commits = {}, {}
    for c, cl in clients.items():
        sealed[c], commits[c] = cl.share(adverts, server.t)
    routed = server.route(sealed, commits)
    if tamper:
        tamper(routed)
    for c, cl in clients.items():
        cl.receive(routed[c])
    ys = {c: cl.mask(xs[c], server.members) for c, cl in clients.items()}
    survivors = [c for c in server.members if c not in drop]
    total = np.zeros_like(next(iter(xs.values())))
    for c in survivors:
        total += ys[c]  # uint32: wraps mod 2^32, as MPI_SUM does
    reveals = {c: clients[c].reveal(survivors, [u for u in server.members if u not in survivors]) for c in survivors}
    if lie:
        lie(reveals)
    return server.unmask(total, survivors, reveals), ys


def _inputs(n, dim=1000, seed=0):
    fp = FixedPoint(bound=1.0, fan_out=n)
    rng = np.random.default_rng(seed)
    raw = {c: rng.uniform(-1, 1, dim) for c in range(10, 10 + n)}
    return fp, raw, {c: fp.encode(v, 1.0)[0] for c, v in raw.items()}


def test_unmasked_sum_is_the_plaintext_fixed_point_sum_bit_for_bit():
    fp, raw, xs = _inputs(4)
    got, ys = run(xs)
    want = np.zeros(1001, dtype=np.uint32)
    for x in xs.values():
        want += x
    np.testing.assert_array_equal(got, want)
    assert all(not np.array_equal(ys[c], xs[c]) for c in xs)  # what travelled was masked
    decoded = fp.decode(got)
    np.testing.assert_allclose(decoded[:-1], sum(raw.values()), atol=4 / fp.scale)  # each client rounds by <= 1/(2S)
    assert decoded[-1] == 4


def _chi2_bytes(y: np.ndarray) -> float:
    counts = np.bincount(y.view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_masked_update_looks_uniform():
    """Chi-square over the 256 byte values of one client's masked update (40,000 bytes) stays below
    the 0.1% critical value for 255 degrees of freedom (330.5); its plaintext encoding does not."""
    _, _, xs = _inputs(3, dim=10_000)
    _, ys = run(xs)
    c = min(xs)
    assert _chi2_bytes(ys[c]) < 330.5
    assert _chi2_bytes(xs[c]) > 330.5  # the test can fail: fixed-point updates are far from uniform


def test_dropped_clients_masks_are_removed():
    fp, raw, xs = _inputs(5)
    drop = {11, 13}
    got, _ = run(xs, drop=drop)
    want = np.zeros(1001, dtype=np.uint32)
    for c, x in xs.items():
        if c not in drop:
            want += x
    np.testing.assert_array_equal(got, want)
    assert fp.decode(got)[-1] == 3


def test_fewer_survivors_than_the_threshold_fail():
    _, _, xs = _inputs(5)
    assert threshold(5, 0.5) == 3
    with pytest.raises(SecAggError, match="2 of 5 clients survived, fewer than the threshold t=3"):
        run(xs, drop={10, 11, 12})


def test_tampered_share_is_detected():
    _, _, xs = _inputs(4)

    def flip(routed):
        blob = bytearray(routed[12][11])
        blob[-1] ^= 1
        routed[12][11] = bytes(blob)

    with pytest.raises(SecAggError, match=r"client\(s\) \[11\] failed authentication"):
        run(xs, tamper=flip)


@pytest.mark.parametrize("drop, kind, match", [(set(), "b", "does not match its commitment"),
                                               ({13}, "s", "does not match its public key")])
def test_a_wrong_revealed_share_is_detected(drop, kind, match):
    """A holder that reveals a wrong share (after decryption) makes the rebuilt seed fail its check."""
    _, _, xs = _inputs(4)
    owner = 13 if kind == "s" else 10

    def lie(reveals):
        first = min(reveals)
        share = bytearray(reveals[first][kind][owner])
        share[-1] ^= 1
        reveals[first][kind][owner] = bytes(share)

    with pytest.raises(SecAggError, match=match):
        run(xs, drop=drop, lie=lie)


def test_missing_shares_are_detected():
    _, _, xs = _inputs(4)

    def lose(reveals):
        for r in list(reveals.values())[1:]:
            r["b"].pop(10, None)

    with pytest.raises(SecAggError, match="shares of client 10's seed arrived"):
        run(xs, lie=lose)


def test_shamir_t_shares_rebuild_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    for pick in ([1, 2, 3], [2, 4, 5], [1, 3, 5, 4]):
        assert shamir.combine({x: shares[x] for x in pick}) == secret
    assert shamir.combine({x: shares[x] for x in (1, 2)}) != secret


def test_fixed_point_cannot_overflow_at_the_largest_fan_out():
    for n in (1, 2, 16, 1000):
        fp = FixedPoint(bound=0.5, fan_out=n)
        for sign in (1.0, -1.0):
            total = np.zeros(3, dtype=np.uint32)
            for _ in range(n):
                total += fp.encode(np.full(2, sign * 0.5), 1.0)[0]
            got = fp.decode(total)
            np.testing.assert_allclose(got[:-1], sign * 0.5 * n, rtol=0, atol=n / (2 * fp.scale))  # n roundings of <= 1/(2S)
            assert got[-1] == n
    _, saturated = FixedPoint(1.0, 2).encode(np.array([3.0, -0.2]), 1.0)
    assert saturated == 1


@pytest.mark.parametrize("sets, topology, message", [
    ({}, "flat", "flat topology has none"),
    ({"compression.device_up": "'topk:0.1 > int8'"}, "default", "top-k is refused under secure aggregation"),
    ({"compression.device_up": "int8"}, "default", "fixed-point ring elements"),
    ({"aggregation.edge.name": "median"}, "default", "must see every update"),
    ({}, "edge-clients", "needs edges that only aggregate"),
])
def test_secagg_refuses_what_it_cannot_honour_in_one_line(sets, topology, message):
    from hierfed.config import load_config
    from hierfed.errors import HierfedError
    from hierfed.privacy import check_privacy
    from hierfed.topology import load_topology

    cfg = load_config(None, ["privacy.secagg=true", "privacy.secagg_bound=1.0", *(f"{k}={v}" for k, v in sets.items())])
    with pytest.raises(HierfedError, match=message) as e:
        check_privacy(load_topology(topology).placement(), cfg)
    assert "\n" not in str(e.value)


def test_secagg_needs_a_bound():
    from hierfed.config import load_config
    from hierfed.errors import HierfedError

    with pytest.raises(HierfedError, match="secagg_bound"):
        load_config(None, ["privacy.secagg=true"])
    assert load_config(None, ["privacy.secagg=true", "privacy.clip=1.0"]).privacy.secagg
