"""Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping")
against the paper's formulas written out here, and its noise split against dp-accounting composed
independently: the update sum and the clipped-count are two Gaussian mechanisms. With the noise at
the cloud over edges, a cloud, two edges and their devices run in one process over in-process
channels, wired as the roles wire them, against the paper's server written out in numpy."""

from __future__ import annotations

import math
from functools import partial

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from hierfed.comm.codecs import parse_codec
from hierfed.comm.links import Child, Parent
from hierfed.config import load_config
from hierfed.errors import HierfedError
from hierfed.privacy import Accountant, NoisySum, PrivateChild, check_privacy, wrap_child, wrap_parent, wrap_strategy, wrap_up
from hierfed.privacy.noise import gaussian
from hierfed.privacy.transport import AdaptiveParent
from hierfed.roles.protocol import aggregation_round
from hierfed.strategy import FedAvg, build_strategy
from hierfed.topology import load_topology


def _cfg(**sets):
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


ADAPTIVE = {"privacy.clip": 1.0, "privacy.noise_multiplier": 1.0, "privacy.adaptive_clip.quantile": 0.5,
            "privacy.adaptive_clip.lr": 0.2, "privacy.adaptive_clip.count_stddev": 2.0}


class _Chan:
    """A channel's two collectives, as the device sees them: the parent's C arrives by bcast; the
    device's Σ(b − ½) leaves by reduce_sum."""

    def __init__(self, clip: float) -> None:
        self.clip, self.sent = clip, []

    def bcast(self, buf, receivers=None, raw=None):
        buf[0] = self.clip

    def reduce_sum(self, buf, senders=1):
        self.sent.append(float(buf[0]))


class _Child:
    def __init__(self, clip):
        self.channel, self.added = _Chan(clip), []

    def receive(self, out):
        pass

    def add(self, sender, weight, delta, rng=None):
        self.added.append((sender, weight, delta))

    def send(self):
        return float(len(self.added))


def _round(private, clip, norms, rng):
    """One round on a device whose clients' updates have the given L2 norms: returns Σ(b − ½) sent."""
    private.child.channel.clip = clip
    private.receive(np.zeros(4, dtype=np.float32))
    assert private.clip == clip  # the device clips to the parent's current C
    for c, n in enumerate(norms):
        v = rng.normal(size=4)
        private.add(c, 1.0, (v / np.linalg.norm(v) * n).astype(np.float32))
    private.send()
    for _, _, d in private.child.added:
        assert np.linalg.norm(d.astype(np.float64)) <= clip * (1 + 1e-6)
    private.child.added.clear()
    return private.child.channel.sent[-1]


def test_clip_norm_follows_the_papers_geometric_update():
    """C_{t+1} = C_t · exp(−η_C (b̄ − γ)), b̄ = (Σ_i b_i + N(0, σ_b²)) / n with b_i = 1[‖Δ_i‖ <= C_t]:
    written out here, with the bits counted from the norms in numpy and the count noise drawn as
    NoisySum seeds it (its std is checked over many draws below)."""
    cfg = _cfg(**ADAPTIVE)
    a = cfg.privacy.adaptive_clip
    private = PrivateChild(_Child(1.0), 1.0, 1.0, uniform=True, distributed=False, seed=0, start_round=1, edge_rounds=1,
                           agg_size=lambda t: 8, adaptive=True)
    noisy = NoisySum(FedAvg(), cfg.privacy.value_noise_multiplier, 1.0, seed=3, who=1, adaptive=a)
    rng = np.random.default_rng(0)
    clip = 1.0
    for _ in range(12):
        norms = rng.uniform(0.0, 4.0, 8)
        centered = _round(private, clip, norms, rng)
        bits = np.sum(norms <= clip)
        assert centered == pytest.approx(bits - 4.0)  # Σ(b_i − ½): sensitivity ½
        noisy.bits = centered
        before = noisy.calls
        reduced = np.zeros(5, dtype=np.float32)
        reduced[-1] = 8.0  # 8 clients, uniform weights
        noisy.aggregate(np.zeros(4), reduced.copy())
        drawn = gaussian(1, a.count_stddev, 3, 1, before, 0xB17)[0]  # the count noise's seeded draw (std: next test)
        want = clip * math.exp(-a.lr * ((bits + drawn) / 8 - a.quantile))
        assert noisy.clip == pytest.approx(want, rel=1e-12)
        assert noisy.calls == before + 1
        clip = noisy.clip
    state = noisy.state_dict()
    assert state["dp_clip"][0] == clip and state["dp_calls"][0] == 12
    again = NoisySum(FedAvg(), 1.0, 1.0, seed=3, who=1, adaptive=a)
    again.load_state_dict(state)
    assert again.clip == clip and again.calls == 12  # a resume continues from the same C and noise stream


def test_count_noise_has_std_sigma_b_and_clip_tracks_the_quantile():
    """The noise on the clipped-count has std σ_b (400 draws, ±15%); with σ_b small the clip norm
    converges to the γ-quantile of the norms (uniform on [0, 10]: γ = 0.3 -> 3)."""
    cfg = _cfg(**ADAPTIVE)
    a = cfg.privacy.adaptive_clip
    draws = []
    for calls in range(400):
        noisy = NoisySum(FedAvg(), 1.0, 1.0, seed=5, who=2, adaptive=a)
        noisy.calls = calls
        noisy.bits = 0.0  # Σ(b − ½) = 0 with n = 10: b̄ = ½ + noise/10
        reduced = np.zeros(3, dtype=np.float32)
        reduced[-1] = 10.0
        noisy.aggregate(np.zeros(2), reduced)
        draws.append((math.log(noisy.clip) / -a.lr + a.quantile - 0.5) * 10)
    assert np.std(draws) == pytest.approx(a.count_stddev, rel=0.15)
    quiet = _cfg(**{**ADAPTIVE, "privacy.noise_multiplier": 0.01, "privacy.adaptive_clip.count_stddev": 0.01,
                    "privacy.adaptive_clip.quantile": 0.3}).privacy.adaptive_clip
    noisy = NoisySum(FedAvg(), 0.01, 1.0, seed=0, who=0, adaptive=quiet)
    rng = np.random.default_rng(1)
    for _ in range(300):
        norms = rng.uniform(0, 10, 200)
        noisy.bits = float(np.sum(norms <= noisy.clip)) - 100.0
        reduced = np.zeros(3, dtype=np.float32)
        reduced[-1] = 200.0
        noisy.aggregate(np.zeros(2), reduced)
    assert noisy.clip == pytest.approx(3.0, rel=0.15)


def test_accountant_includes_the_count_noise_as_dp_accounting_composes_it():
    """Noise at the edges, τ2 = 2, every client each round: per aggregation the update sum is a Gaussian
    mechanism with multiplier σ_Δ (sensitivity C) and the centred count one with 2σ_b (sensitivity
    ½); dp-accounting composes the 2·τ2·T events here, independently of hierfed's single-event form.
    The paper's split σ_Δ = (σ^-2 − (2σ_b)^-2)^(-1/2) makes the pair cost what σ alone costs."""
    sigma, sigma_b = 1.0, 2.0
    cfg = _cfg(**{**ADAPTIVE, "schedule.tau2": 2, "privacy.noise_multiplier": sigma, "privacy.adaptive_clip.count_stddev": sigma_b})
    value = (sigma**-2 - (2 * sigma_b) ** -2) ** -0.5
    assert cfg.privacy.value_noise_multiplier == pytest.approx(value, rel=1e-15) and value > sigma
    acc = Accountant(cfg, flat=False, num_clients=4)
    for T in (1, 3, 10):
        oracle = rdp.RdpAccountant()
        oracle.compose(dp_accounting.GaussianDpEvent(value), 2 * T)
        oracle.compose(dp_accounting.GaussianDpEvent(2 * sigma_b), 2 * T)
        assert acc.epsilon(T) == pytest.approx(oracle.get_epsilon(1e-5), rel=1e-9)
    # the same σ without adaptive clipping: the same ε (the count is paid for by the larger σ_Δ)
    plain = Accountant(_cfg(**{"privacy.clip": 1.0, "privacy.noise_multiplier": sigma, "schedule.tau2": 2}), flat=False, num_clients=4)
    assert plain.epsilon(3) == pytest.approx(acc.epsilon(3), rel=1e-9)
    # ...whereas σ_Δ = σ with the count noised on top would spend more: the count is not free
    extra = rdp.RdpAccountant()
    extra.compose(dp_accounting.GaussianDpEvent(sigma), 6)
    extra.compose(dp_accounting.GaussianDpEvent(2 * sigma_b), 6)
    assert extra.get_epsilon(1e-5) > acc.epsilon(3)
    # Poisson sampling: the sampled pair is a sampled Gaussian with the combined multiplier
    pois = Accountant(_cfg(**{**ADAPTIVE, "schedule.tau2": 1, "schedule.sampling": "poisson", "schedule.client_fraction": 0.2}),
                      flat=True, num_clients=50)
    z = (value**-2 + (2 * sigma_b) ** -2) ** -0.5
    oracle = rdp.RdpAccountant()
    oracle.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(z)), 7)
    assert pois.epsilon(7) == pytest.approx(oracle.get_epsilon(1e-5), rel=1e-9)


def test_adaptive_parent_sends_c_and_hands_back_the_count():
    class _Parent:
        def __init__(self):
            self.channel, self.sent = self, []

        def send(self, params, receivers=None, rng=None):
            self.sent.append("params")

        def bcast(self, buf, receivers=None, raw=None):
            self.sent.append(float(buf[0]))

        def receive(self):
            return np.zeros(3)

        def reduce_sum(self, buf, senders=1):
            buf[0] = -1.5

    a = _cfg(**ADAPTIVE).privacy.adaptive_clip
    noisy = NoisySum(FedAvg(), 1.0, 0.7, seed=0, who=0, adaptive=a)
    link = AdaptiveParent(_Parent(), noisy)
    link.send(np.zeros(2))
    assert link.parent.sent == ["params", 0.7]
    link.receive()
    assert noisy.bits == -1.5
    with pytest.raises(RuntimeError, match="clipped-count"):
        NoisySum(FedAvg(), 1.0, 0.7, seed=0, who=0, adaptive=a).aggregate(np.zeros(2), np.array([0.0, 0.0, 1.0]))


@pytest.mark.parametrize("sets, message", [
    ({"privacy.adaptive_clip.count_stddev": 0.4}, "must exceed noise_multiplier/2"),
    ({"privacy.noise_at": "distributed"}, "distributed is not supported"),
    ({"privacy.noise_multiplier": 0.0}, "needs privacy.noise_multiplier > 0"),
])
def test_adaptive_clip_config_refusals(sets, message):
    with pytest.raises(HierfedError, match=message) as e:
        _cfg(**{**ADAPTIVE, **sets})
    assert "\n" not in str(e.value)


def test_adaptive_clip_allowed_at_a_cloud_over_edges_at_the_edges_and_flat():
    cloud = {**ADAPTIVE, "privacy.noise_at": "cloud", "schedule.tau2": 1}
    check_privacy(load_topology("default").placement(), _cfg(**cloud))
    check_privacy(load_topology("flat").placement(), _cfg(**{**ADAPTIVE, "privacy.noise_at": "cloud"}))
    check_privacy(load_topology("default").placement(), _cfg(**ADAPTIVE))
    # what noise at the cloud needs anyway still holds: one edge round (an edge passes on its devices' sum)
    with pytest.raises(HierfedError, match="noise_at: cloud needs schedule.tau2: 1") as e:
        check_privacy(load_topology("default").placement(), _cfg(**{**cloud, "schedule.tau2": 2}))
    assert "\n" not in str(e.value)


class _Wire:
    """A parent-children channel inside one process, used in the order the ranks use it: a child's
    k-th bcast reads the parent's k-th; the parent's k-th reduce_sum is the sum of its children's
    k-th (each child's contributions are kept: `sent[child]`). Bytes counted as the Channel counts
    them: a broadcast once per child at the parent, a reduce at each child."""

    def __init__(self, children: int) -> None:
        self.down: list[np.ndarray] = []
        self.read = [0] * children
        self.sent: list[list[np.ndarray]] = [[] for _ in range(children)]
        self.reduced = 0
        self.bytes = {"down": 0, "up": 0}

    def end(self, child: int | None = None) -> _End:
        return _End(self, child)


class _End:
    def __init__(self, wire: _Wire, child: int | None) -> None:
        self.wire, self.child = wire, child

    def bcast(self, buf, receivers=None, raw=None):
        w = self.wire
        if self.child is None:
            w.down.append(buf.copy())
            w.bytes["down"] += buf.nbytes * len(w.read)
        else:
            buf[...] = w.down[w.read[self.child]]
            w.read[self.child] += 1

    def reduce_sum(self, buf, senders=1, raw=None):
        w = self.wire
        if self.child is None:
            buf[...] = np.sum([s[w.reduced] for s in w.sent], axis=0)
            w.reduced += 1
        else:
            w.sent[self.child].append(buf.copy())
            w.bytes["up"] += buf.nbytes

    def gather_obj(self, obj):  # telemetry: none here
        return [] if self.child is None else None


def _device_rounds(devices, links, sampled, deltas, start, clip):
    """One edge round of an edge's devices: receive the edge's parameters and C, then clip and send
    their sampled clients' updates (weight 10: uniform under noise)."""
    for clients, link in zip(devices, links):
        got = np.empty(start.size, dtype=np.float32)
        link.receive(got)
        assert link.clip == clip and np.array_equal(got, start)  # the cloud's C and parameters, through the edge
        for c in sorted(set(clients) & sampled):
            link.add(c, 10.0, deltas[c])
        link.send()


def _edge_rounds(edges, sampled, deltas, clip):
    """Each edge's cloud round as roles/edge.py runs it with τ2 = 1: receive, one aggregation of its
    devices, its change up (weighted by its clients: their sum) and then the count."""
    for e, (up, down, strategy, devices, links) in enumerate(edges):
        start = np.empty(down.dim, dtype=np.float32)
        up.receive(start)
        work = partial(_device_rounds, devices, links, sampled, deltas, start, clip)
        local, weight, _, _ = aggregation_round(down, start.astype(np.float64), strategy, while_children_work=work)
        assert down.report()["clip"] == clip  # the edge row's C: the cloud's
        if weight > 0:
            up.add(e, weight, local - start)
        up.send()


def test_adaptive_clipping_with_noise_at_the_cloud_over_edges_is_the_papers_server_over_all_clients():
    """noise_at: cloud over two edges (devices with 2 + 1 and 3 clients): the cloud keeps C, it goes
    cloud -> edges -> devices after the parameters, each device clips to it and sends Σ(b_c − ½),
    each edge passes its devices' sum on after its update, and the cloud adds N(0, σ_b²) once and
    moves C over all the round's clients. Against the paper written out in numpy from the clients'
    norms: Σ clipped Δ_c + N(0, (σ_Δ C)²) over n, b̄ = (Σ b_c + N(0, σ_b²))/n, C <- C·exp(−η(b̄ − γ)),
    n the clients of all edges; each edge's count is its clients' Σ(b_c − ½), and the cloud's is
    their sum. In round 3 the second edge has no sampled client (it sends 0). The extra float64s
    are counted: 8 bytes a child each way per round on the cloud's link."""
    seed, dim = 11, 6
    cfg = _cfg(**{**ADAPTIVE, "privacy.noise_at": "cloud", "schedule.tau2": 1, "seed": seed})
    placement = load_topology("default").placement()
    check_privacy(placement, cfg)
    p, a = cfg.privacy, cfg.privacy.adaptive_clip
    ident = parse_codec("identity")
    layout = [[[0, 1], [2]], [[3, 4, 5]]]  # edge -> its devices -> their clients
    cloud_wire = _Wire(len(layout))
    noisy = wrap_strategy(build_strategy(cfg.aggregation.cloud), cfg, "cloud", False, 0)
    assert isinstance(noisy, NoisySum) and noisy.clip == p.clip
    cloud = wrap_parent(Parent(cloud_wire.end(), ident, ident, dim), cfg, placement, None, 1, noisy)
    edges = []
    for e, devices in enumerate(layout):
        wire = _Wire(len(devices))
        up, relay = wrap_up(Child(cloud_wire.end(e), ident, ident, dim, False), cfg, placement)
        assert relay is not None
        down = wrap_parent(Parent(wire.end(), ident, ident, dim), cfg, placement, e, 1, relay)
        strategy = wrap_strategy(build_strategy(cfg.aggregation.edge), cfg, "edge", False, 1 + e)
        links = [wrap_child(Child(wire.end(d), ident, ident, dim, False), cfg, placement, e, 1, lambda t: 0)
                 for d in range(len(devices))]
        edges.append((up, down, strategy, devices, links))

    rng = np.random.default_rng(0)
    params, clip = np.zeros(dim), p.clip
    for t in range(1, 5):
        sampled = {0, 1, 2} if t == 3 else {0, 1, 2, 3, 4, 5}
        norms = {c: clip * rng.uniform(0.3, 2.0) for c in sampled}
        deltas = {c: (v / np.linalg.norm(v) * norms[c]).astype(np.float32) for c in sampled for v in [rng.normal(size=dim)]}
        work = partial(_edge_rounds, edges, sampled, deltas, clip)  # the edges and their devices, while the cloud waits
        before, start = [len(s) for s in cloud_wire.sent], params.copy()
        params, weight, _, _ = aggregation_round(cloud, params, noisy, while_children_work=work)
        assert cloud.report()["clip"] == clip
        # each edge's Reduce to the cloud: its update, then its devices' count
        counts = [float(cloud_wire.sent[e][before[e] + 1][0]) for e in range(len(layout))]
        for e, devices in enumerate(layout):
            mine = [c for d in devices for c in d if c in sampled]
            assert counts[e] == sum((norms[c] <= clip) - 0.5 for c in mine)

        # the paper's server, written out: the noise drawn from (seed, cloud rank 0, aggregation t − 1)
        n = len(sampled)
        assert weight == n  # uniform weights: n counts the clients of both edges
        value_noise = np.random.default_rng([seed, 0, t - 1, 0xD1FF]).standard_normal(dim) * p.value_noise_multiplier * clip
        count_noise = np.random.default_rng([seed, 0, t - 1, 0xB17, 0xD1FF]).standard_normal(1)[0] * a.count_stddev
        clipped = sum(deltas[c].astype(np.float64) * min(1.0, clip / norms[c]) for c in sampled)
        np.testing.assert_allclose(params, start + (clipped + value_noise) / n, rtol=1e-5, atol=1e-6)
        b = sum(norms[c] <= clip for c in sampled)
        frac = (b + count_noise) / n
        assert noisy.report()["unclipped"] == pytest.approx(frac, rel=1e-12)
        assert n * (frac - 0.5) - count_noise == pytest.approx(sum(counts), abs=1e-12)  # the cloud's count: the edges' sum
        clip = clip * math.exp(-a.lr * (frac - a.quantile))
        assert noisy.clip == pytest.approx(clip, rel=1e-12)
        clip = noisy.clip
    assert cloud_wire.bytes == {"down": 4 * (4 * dim + 8) * 2, "up": 4 * (4 * (dim + 1) + 8) * 2}


def test_an_edge_relays_nothing_without_adaptive_clipping_at_the_cloud():
    """wrap_up wraps an edge's uplink only when the cloud keeps C: noise at the edges (the edge keeps
    its own), or no adaptive clipping, leave it as it is."""
    placement = load_topology("default").placement()
    for sets in (ADAPTIVE, {"privacy.clip": 1.0, "privacy.noise_multiplier": 1.0, "privacy.noise_at": "cloud", "schedule.tau2": 1}):
        link = object()
        assert wrap_up(link, _cfg(**sets), placement) == (link, None)
