"""Secure aggregation (Bonawitz et al. 2017) in one process: exact cancellation against the plaintext
fixed-point sum, uniform-looking masked updates (chi-square), dropouts, corrupt shares, Shamir."""

from __future__ import annotations

import numpy as np
import pytest

from hierfed.privacy import shamir
from hierfed.privacy.ring import FixedPoint, SharedGrid
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


def _plain_sum(xs: dict, drop: set) -> np.ndarray:
    """The oracle: the survivors' fixed-point updates summed in Z_2^32 without any mask."""
    want = np.zeros(1001, dtype=np.uint32)
    for c, x in xs.items():
        if c not in drop:
            want += x
    return want


def test_dropped_clients_masks_are_removed():
    fp, raw, xs = _inputs(5)
    drop = {11, 13}
    got, _ = run(xs, drop=drop)
    np.testing.assert_array_equal(got, _plain_sum(xs, drop))
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
    ({"compression.device_up": "bf16"}, "default", "use identity, fp32, int8 or int4"),
    ({"compression.device_up": "int8", "schedule.edge_mode": "fedbuff"}, "default", "FedBuff edges is not supported"),
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


# --- the int8 codec's codes under secure aggregation (quantise, then mask) ---------------------------


def _int8_oracle(x: np.ndarray, bound: float, u: np.ndarray) -> np.ndarray:
    """Stochastic rounding onto the shared symmetric int8 grid, written out: step = B/127,
    q = floor(x/step + u) in [-127, 127] (u the same uniforms the codec draws)."""
    step = bound / 127
    return np.clip(np.floor(np.clip(x, -bound, bound) / step + u), -127, 127).astype(np.int64)


def test_int8_codes_unmasked_sum_is_the_plaintext_code_sum_bit_for_bit():
    """Four clients quantise w·Δ on the shared grid and mask the codes: the edge's unmasked sum is the
    sum of the plaintext codes mod 2^32, bit for bit, and decodes to step·Σq exactly."""
    bound, grid = 2.0, SharedGrid(2.0, 8)
    rng = np.random.default_rng(7)
    raw = {c: rng.uniform(-2.5, 2.5, 1000) for c in range(20, 24)}  # some coordinates beyond ±B saturate
    xs, codes, sat = {}, {}, 0
    for c, v in raw.items():
        words, n_sat, carried = grid.encode(v, 3.0, np.random.default_rng(c))
        codes[c] = _int8_oracle(v, bound, np.random.default_rng(c).random(v.size))
        np.testing.assert_array_equal(words[:-1].view(np.int32), codes[c])  # the codes the oracle draws
        np.testing.assert_array_equal(carried, codes[c] * (bound / 127))
        assert np.abs(codes[c]).max() <= 127
        xs[c], sat = words, sat + n_sat
    assert sat == sum(int(np.count_nonzero(np.abs(v) > bound)) for v in raw.values()) > 0
    got, ys = run(xs)
    want = np.zeros(1001, dtype=np.uint32)
    for c in xs:
        want += xs[c]
    np.testing.assert_array_equal(got, want)
    assert all(not np.array_equal(ys[c], xs[c]) for c in xs)
    decoded = grid.decode(got)
    np.testing.assert_array_equal(decoded[:-1], sum(codes.values()).astype(np.float64) * (bound / 127))
    assert decoded[-1] == 12
    # unbiased: on [-B, B] the mean decoded value over many draws is x (std of one code <= step/2)
    x = np.linspace(-bound, bound, 50)
    mean = np.mean([grid.values(grid.codes(x, np.random.default_rng(k))[0]) for k in range(4000)], axis=0)
    assert np.abs(mean - x).max() < 5 * (bound / 127) / 2 / np.sqrt(4000)


def test_int8_error_feedback_residual_stays_on_the_device_unmasked():
    """SecAggChild on a shared grid keeps, per client, r = (w·Δ + r_old) − step·q on the device: over
    rounds the carried values sum to Σ w·Δ − r_T (the residual is never masked nor sent)."""
    from hierfed.privacy.secagg_link import SecAggChild

    class _Link:
        dim = 300

    grid = SharedGrid(0.5, 8)
    child = SecAggChild(_Link(), grid, 0.5, edge=0, start_round=1, edge_rounds=1, error_feedback=True)
    rng = np.random.default_rng(1)
    sent_sum, in_sum = np.zeros(300), np.zeros(300)
    for t in range(6):
        delta = rng.normal(0, 0.01, 300).astype(np.float32)
        child.add(5, 4.0, delta, np.random.default_rng(t))
        words = child._queued.pop(5)[0]
        sent_sum += words[:-1].view(np.int32) * grid.step
        in_sum += delta.astype(np.float64) * 4.0
        assert words[-1] == 4
    np.testing.assert_allclose(sent_sum, in_sum - child.residual[5], rtol=0, atol=1e-12)
    assert np.abs(child.residual[5]).max() < grid.step + 1e-12 and np.abs(child.residual[5]).max() > 0
    state = child.state_dict()
    assert list(state) == ["residual/5"]
    other = SecAggChild(_Link(), grid, 0.5, edge=0, start_round=7, edge_rounds=1, error_feedback=True)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.residual[5], child.residual[5])


def test_int8_and_int4_uplinks_compose_with_secagg_and_topk_is_refused():
    from hierfed.config import load_config
    from hierfed.errors import HierfedError
    from hierfed.privacy import check_privacy
    from hierfed.privacy.setup import fixed_point
    from hierfed.topology import load_topology

    placement = load_topology("default").placement()
    for spec, levels in (("int8", 127), ("'int8:block=64'", 127), ("int4", 7)):
        cfg = load_config(None, ["privacy.secagg=true", "privacy.secagg_bound=2.0", f"compression.device_up={spec}"])
        check_privacy(placement, cfg)
        grid = fixed_point(cfg, placement)
        assert isinstance(grid, SharedGrid) and grid.levels == levels and grid.step == 2.0 / levels
    cfg = load_config(None, ["privacy.secagg=true", "privacy.secagg_bound=2.0", "compression.device_up='topk:0.1'"])
    with pytest.raises(HierfedError, match="top-k is refused"):
        check_privacy(placement, cfg)


# --- dropouts driven by the behaviour model (issue #14's hierfed.sim.behaviour) ---------------------


def test_behaviour_dropouts_are_removed_by_shares_and_below_t_fail():
    """The behaviour model decides which sampled, reachable clients vanish mid-round (after keys and
    shares, before sending): those are exactly the clients whose masks the edge removes, and the
    sum is the survivors' plaintext sum; a round with fewer than t survivors fails cleanly."""
    from hierfed.config import load_config
    from hierfed.privacy.setup import behaviour_dropouts
    from hierfed.sim.behaviour import drops_out, is_available
    from hierfed.topology import Behaviour

    class _Device:
        clients = list(range(10, 18))
        behaviour = Behaviour(0.9, 0.3)

    cfg = load_config(None, ["seed=3"])
    dropped = behaviour_dropouts(cfg, _Device, lambda t: set(range(10, 17)))  # client 17 is not sampled
    seen = []
    for t in range(1, 30):
        got_drop = dropped(t, 1)
        want = {c for c in range(10, 17) if is_available(_Device.behaviour, 3, t, 1, c) and drops_out(_Device.behaviour, 3, t, 1, c)}
        assert got_drop == want and 17 not in got_drop
        seen.append(len(got_drop))
    assert 0 < np.mean(seen) / 7 < 0.6  # 0.9 x 0.3 = 0.27 in expectation: some drop, not all
    assert behaviour_dropouts(cfg, type("D", (), {"clients": [1], "behaviour": Behaviour(1.0, 0.0)}), lambda t: {1}) is None

    _, _, xs = _inputs(7)  # clients 10..16
    t_ok = next(t for t in range(1, 30) if 0 < len(dropped(t, 1)) <= 2)
    drop = dropped(t_ok, 1)
    members = {c: x for c, x in xs.items() if is_available(_Device.behaviour, 3, t_ok, 1, c)}
    got, _ = run(members, drop=drop)
    np.testing.assert_array_equal(got, _plain_sum(members, drop))
    heavy = Behaviour(1.0, 0.8)

    class _Flaky(_Device):
        behaviour = heavy

    many = behaviour_dropouts(cfg, _Flaky, lambda t: set(range(10, 17)))
    t_bad = next(t for t in range(1, 30) if len(many(t, 1)) > 3)  # 7 members, t = 4: fewer than 4 survive
    with pytest.raises(SecAggError, match="fewer than the threshold t=4"):
        run(xs, drop=many(t_bad, 1))


# --- the narrower ring: int8/int4 codes in Z_2^16 when the edge's sum fits ---------------------------


def test_int8_codes_in_z16_unmask_to_the_plaintext_sum_bit_for_bit_through_wrap_around():
    """An edge of 258 clients (the most whose int8 code sums stay in int16: 258·127 = 32766) masks
    in Z_2^16; 4 of them take part, with codes at the extremes (±127, so negative codes are words
    near 2^16 and the plain sum wraps) and large sample counts (the weight's limbs). The running
    masked sum overflows 16 bits, yet the unmasked sum is the uint16 sum of the plaintext words,
    bit for bit, and decodes to step·Σq and Σw exactly (the oracle: int64 arithmetic)."""
    grid = SharedGrid(2.0, 8, fan_out=258)
    assert grid.ring == 16 and grid.dtype == np.uint16
    assert grid.limb == 7 and grid.words(1000) == 1000 + 5  # 258·(2^7 − 1) <= 65535 < 258·(2^8 − 1)
    rng = np.random.default_rng(3)
    raw = {c: rng.choice([-2.5, 2.5, -1.99, 0.0], 1000) for c in range(30, 34)}
    weights = {30: 70_000.0, 31: 123_456.0, 32: 1.0, 33: 2**31 - 300_000.0}  # far past 16 bits; Σ < 2^31 + 2^17
    xs, codes = {}, {}
    for c, v in raw.items():
        xs[c], _, _ = grid.encode(v, weights[c], np.random.default_rng(c))
        codes[c] = _int8_oracle(v, 2.0, np.random.default_rng(c).random(v.size))
        assert xs[c].dtype == np.uint16 and xs[c].size == 1005
    assert min(c.min() for c in codes.values()) == -127 and max(c.max() for c in codes.values()) == 127
    got, ys = run(xs)
    assert got.dtype == np.uint16 and all(y.dtype == np.uint16 for y in ys.values())
    want = np.zeros(1005, dtype=np.uint16)
    for x in xs.values():
        want += x  # wraps mod 2^16
    np.testing.assert_array_equal(got, want)
    assert (sum(y.astype(np.int64) for y in ys.values()) >= 2**16).mean() > 0.5  # masked sums did wrap
    assert all(not np.array_equal(ys[c], xs[c]) for c in xs)
    decoded = grid.decode(got)
    np.testing.assert_array_equal(decoded[:-1], sum(codes.values()).astype(np.float64) * (2.0 / 127))
    total_w = int(sum(weights.values()))
    assert decoded[-1] == (total_w - 2**32 if total_w >= 2**31 else total_w)  # as one int32 word would read it


@pytest.mark.parametrize("bits, levels", [(8, 127), (4, 7)])
def test_the_largest_fan_out_in_z16_cannot_overflow(bits, levels):
    """At the largest 16-bit fan-out n (n·L <= 2^15 − 1), n clients all at +L or all at −L, each
    with weight 2^31 // n (the weight limbs' worst case), sum and decode exactly."""
    n = (2**15 - 1) // levels
    grid = SharedGrid(1.0, bits, fan_out=n)
    assert grid.ring == 16
    for sign in (1.0, -1.0):
        words = grid.encode(np.full(3, sign), 2**31 // n - 1, np.random.default_rng(0))[0]  # every client's alike
        total = np.zeros(grid.words(3), dtype=np.uint16)
        for _ in range(n):
            total += words  # uint16: wraps mod 2^16 at every step, as the Reduce does
        got = grid.decode(total)
        np.testing.assert_array_equal(got[:-1], np.full(3, sign * n * levels) * grid.step)
        assert got[-1] == n * (2**31 // n - 1)


def test_a_fan_out_too_large_for_16_bits_falls_back_to_32():
    """int8: 258 clients fit Z_2^16, 259 do not (259·127 > 32767): Z_2^32 words, one weight word;
    int4 up to 4681. setup.fixed_point picks the width from the edge's clients in the topology, per
    edge, and a 32-bit grid still unmasks to the plaintext sum."""
    from types import SimpleNamespace

    from hierfed.config import load_config
    from hierfed.privacy.setup import fixed_point

    for bits, fits in ((8, 258), (4, 4681)):
        assert SharedGrid(1.0, bits, fan_out=fits).ring == 16
        wide = SharedGrid(1.0, bits, fan_out=fits + 1)
        assert wide.ring == 32 and wide.dtype == np.uint32 and wide.words(10) == 11
    assert SharedGrid(1.0, 8).ring == 32  # no fan-out known: the ring that fits any
    assert FixedPoint(1.0, 2).ring == 32  # fixed point never narrows (its resolution would be n·B/2^15)

    edges = [SimpleNamespace(all_clients=set(range(0, 300))), SimpleNamespace(all_clients=set(range(300, 310)))]
    placement = SimpleNamespace(edges=edges)
    cfg = load_config(None, ["privacy.secagg=true", "privacy.secagg_bound=1.0", "compression.device_up=int8"])
    assert [fixed_point(cfg, placement, e).ring for e in (0, 1)] == [32, 16]
    assert fixed_point(cfg, placement).ring == 32  # the largest edge's

    grid = fixed_point(cfg, placement, 0)
    rng = np.random.default_rng(5)
    xs = {c: grid.encode(rng.uniform(-1.2, 1.2, 500), 9.0, np.random.default_rng(c))[0] for c in (1, 2, 3)}
    got, ys = run(xs)
    assert got.dtype == np.uint32 and ys[1].nbytes == 4 * 501
    np.testing.assert_array_equal(got, sum(xs.values()).astype(np.uint32))
    assert grid.decode(got)[-1] == 27


def test_a_masked_update_in_z16_looks_uniform():
    """The chi-square test of 32-bit masks, for 16-bit masked words (ChaCha20 read as uint16): the
    256 byte values of one client's 20,000 masked words (40,000 bytes) stay below the 0.1% critical
    value (330.5); its plaintext int8 codes do not."""
    grid = SharedGrid(1.0, 8, fan_out=3)
    rng = np.random.default_rng(2)
    xs = {c: grid.encode(rng.normal(0, 0.1, 20_000), 1.0, np.random.default_rng(c))[0] for c in (7, 8, 9)}
    _, ys = run(xs)
    assert ys[7].dtype == np.uint16 and ys[7].nbytes == 2 * grid.words(20_000)
    assert _chi2_bytes(ys[7]) < 330.5
    assert _chi2_bytes(xs[7]) > 330.5
