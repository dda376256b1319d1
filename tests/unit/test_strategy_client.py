"""Client algorithms (hierfed.strategy.client) against independent oracles: FedProx against a
hand-written PyTorch loop, SCAFFOLD on a federated least-squares problem with a closed-form
optimum, the two-tier composition of control variates against flat SCAFFOLD, FedNova against the
paper's normalised update. The local training is hierfed's LocalTrainer on a tiny torch model; the
aggregation is hierfed's aggregation_round on a link that holds the summed contributions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hierfed.config import TrainConfig
from hierfed.roles.protocol import aggregation_round
from hierfed.strategy import FedAvg
from hierfed.strategy.client import ClientAlgorithm, FedNova, FedProx, LocalTerm, Scaffold, fednova_mean
from hierfed.training import LocalTrainer, Tokenized


class Linear(torch.nn.Module):
    """A least-squares client: loss ½ mean (x·w − y)² over the batch (features in input_ids)."""

    def __init__(self, d: int, hidden: bool = False) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(d, dtype=torch.float32))
        self.h = torch.nn.Linear(d, 1) if hidden else None

    def forward(self, input_ids, attention_mask, labels):
        pred = input_ids @ self.w
        if self.h is not None:
            pred = pred + torch.tanh(self.h(input_ids)).squeeze(-1)
        return SimpleNamespace(loss=0.5 * ((pred - labels) ** 2).mean())


def dataset(x: np.ndarray, y: np.ndarray) -> Tokenized:
    return Tokenized(torch.from_numpy(x.astype(np.float32)), torch.ones(len(x)), torch.from_numpy(y.astype(np.float32)))


def vec(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def load(model: torch.nn.Module, v: np.ndarray) -> None:
    at = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(v[at : at + p.numel()]).view_as(p))
            at += p.numel()


class SumLink:
    """The parent end of a tier, without MPI: `receive` returns the children's summed contributions."""

    def __init__(self, reduced: np.ndarray) -> None:
        self.reduced, self.decode_s, self.sent = reduced, 0.0, []
        self.channel = SimpleNamespace(gather_obj=lambda obj: [], bcast=lambda buf, n=None: self.sent.append(buf.copy()))

    def send(self, params, receivers=None, rng=None) -> None:
        pass

    def receive(self) -> np.ndarray:
        return self.reduced


# ---------------------------------------------------------------- FedProx


def _client_data(seed: int = 0, n: int = 24, d: int = 5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return dataset(x, x @ rng.normal(size=d) + 0.3 * rng.normal(size=n))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fedprox_with_mu_0_is_fedavg_bit_for_bit(optimizer: str) -> None:
    data = _client_data()
    cfg = TrainConfig(optimizer=optimizer, lr=0.05, batch_size=8, max_grad_norm=1.0, weight_decay=0.01)
    out = []
    for term in (None, FedProx(0.0).local_term(0)):
        torch.manual_seed(0)
        model = Linear(5, hidden=True)
        LocalTrainer(model, cfg).train(data, 7, seed=11, term=term)
        out.append(vec(model))
    assert np.array_equal(out[0], out[1])
    assert np.abs(out[0]).max() > 0


def test_fedprox_local_update_matches_a_hand_written_torch_loop() -> None:
    """μ > 0: LocalTrainer with FedProx's term against the textbook loop (the proximal term in the
    loss, autograd, clipping, SGD) on the same batches."""
    mu, steps, seed = 0.5, 9, 3
    data = _client_data(1)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, batch_size=8, max_grad_norm=0.5)
    torch.manual_seed(0)
    model = Linear(5, hidden=True)
    start = [p.detach().clone() for p in model.parameters()]
    w0 = vec(model) + np.float32(0.2)  # a start away from the model's init, so the term pulls
    load(model, w0)
    LocalTrainer(model, cfg).train(data, steps, seed, FedProx(mu).local_term(0))
    got = vec(model)

    torch.manual_seed(0)
    ref = Linear(5, hidden=True)
    load(ref, w0)
    anchor = [p.detach().clone() for p in ref.parameters()]
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(len(data), size=8, replace=False))
        loss = ref(data.input_ids[idx], None, data.labels[idx]).loss
        loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(ref.parameters(), anchor))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)
        opt.step()
        opt.zero_grad()
    np.testing.assert_allclose(got, vec(ref), rtol=0, atol=1e-6)
    # and the term matters: without it the update is measurably different
    load(model, w0)
    LocalTrainer(model, cfg).train(data, steps, seed)
    assert np.abs(vec(model) - got).max() > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(start, start))


# ---------------------------------------------------------------- SCAFFOLD on least squares


def _least_squares(n_clients: int = 4, d: int = 3, seed: int = 0):
    """Heterogeneous clients: different feature scales and targets. Global objective
    Σ_i w_i f_i / Σ w_i with f_i(x) = ½ mean_j (a_ij·x − b_ij)²: optimum solves
    (Σ w_i A_iᵀA_i / n_i) x = Σ w_i A_iᵀ b_i / n_i."""
    rng = np.random.default_rng(seed)
    clients = []
    for i in range(n_clients):
        n = 10 + 4 * i
        a = rng.normal(size=(n, d)) * (0.5 + i)  # very different curvatures
        b = a @ rng.normal(size=d) * (1 + 2 * i) + rng.normal(size=n)
        clients.append((a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)))
    weights = [float(len(a)) for a, _ in clients]
    h = sum(w * a.T @ a / len(a) for w, (a, _) in zip(weights, clients))
    g = sum(w * a.T @ b / len(a) for w, (a, b) in zip(weights, clients))
    return clients, weights, np.linalg.solve(h, g)


def _run(algo: ClientAlgorithm, clients, weights, rounds: int, steps: int, lr: float) -> np.ndarray:
    """Flat federated rounds: every client trains `steps` full-batch SGD steps with hierfed's
    LocalTrainer and the algorithm's term; the cloud aggregates with aggregation_round."""
    d = clients[0][0].shape[1]
    cfg = TrainConfig(optimizer="sgd", lr=lr, batch_size=1000, max_grad_norm=None)
    model = Linear(d)
    trainer = LocalTrainer(model, cfg)
    tier, strategy = algo.tier(d, True), FedAvg()
    data = [dataset(a, b) for a, b in clients]
    x = np.zeros(d, dtype=np.float64)
    for t in range(rounds):
        down = tier.down()
        if down is not None:
            algo.receive_down(down)
        x32 = x.astype(np.float32)
        acc = np.zeros(d + 1 + tier.extra, dtype=np.float32)
        for i, w in enumerate(weights):
            load(model, x32)
            trainer.train(data[i], steps, seed=t, term=algo.local_term(i))
            delta, extras = algo.payload(i, vec(model) - x32, w, steps)
            acc[:d] += w * delta
            acc[d] += w
            if extras is not None:
                acc[d + 1 :] += extras
        x, weight, _, _ = aggregation_round(SumLink(acc), x, strategy, tier=tier, send_down=False)
        assert weight == sum(weights)
    return x


def test_scaffold_reaches_the_least_squares_optimum_where_fedavg_stays_biased() -> None:
    clients, weights, opt = _least_squares()
    steps, lr, rounds = 10, 0.04, 40
    fedavg = _run(ClientAlgorithm(), clients, weights, rounds, steps, lr)
    scaffold = _run(Scaffold(lr), clients, weights, rounds, steps, lr)
    scale = np.linalg.norm(opt)
    assert np.linalg.norm(scaffold - opt) / scale < 1e-5, (scaffold, opt)  # observed 3e-8
    assert np.linalg.norm(fedavg - opt) / scale > 0.1, (fedavg, opt)  # observed 0.42: client drift: a fixed point away from the optimum


def test_scaffold_control_variates_compose_over_two_tiers_as_flat_scaffold() -> None:
    """τ2 = 1, full participation: devices → two edges (each its own control variate, reporting
    W_e·Δc_e) → cloud equals one flat SCAFFOLD server over the same clients: the same model and the
    same cloud control variate, round after round."""
    clients, weights, _ = _least_squares(n_clients=5, seed=1)
    d, lr, steps = clients[0][0].shape[1], 0.02, 6
    edges = [[0, 1], [2, 3, 4]]
    data = [dataset(a, b) for a, b in clients]
    cfg = TrainConfig(optimizer="sgd", lr=lr, batch_size=1000, max_grad_norm=None)
    model = Linear(d)
    trainer = LocalTrainer(model, cfg)

    def train(algo: Scaffold, i: int, start: np.ndarray, t: int):
        load(model, start)
        trainer.train(data[i], steps, seed=t, term=algo.local_term(i))
        delta, extras = algo.payload(i, vec(model) - start, weights[i], steps)
        return np.concatenate([weights[i] * delta, [weights[i]], extras]).astype(np.float32)

    flat_algo, flat_tier, x_flat = Scaffold(lr), Scaffold(lr).tier(d, True), np.zeros(d)
    hier_algo, cloud, x_hier = Scaffold(lr), Scaffold(lr).tier(d, False), np.zeros(d)
    edge_tiers = [Scaffold(lr).tier(d, True) for _ in edges]
    for t in range(6):
        flat_algo.receive_down(flat_tier.down())
        x32 = x_flat.astype(np.float32)
        acc = sum(train(flat_algo, i, x32, t) for i in range(len(clients)))
        x_flat, *_ = aggregation_round(SumLink(acc), x_flat, FedAvg(), tier=flat_tier)

        link = SumLink(None)
        down = cloud.down()
        x32 = x_hier.astype(np.float32)
        up = np.zeros(2 * d + 1, dtype=np.float32)
        for e, members in enumerate(edges):
            edge_tiers[e].set_down(down)  # what the cloud broadcast, forwarded to the edge's devices
            hier_algo.receive_down(down)
            acc = sum(train(hier_algo, i, x32, t) for i in members)
            local, w_e, _, _ = aggregation_round(SumLink(acc), x32.astype(np.float64), FedAvg(), tier=edge_tiers[e])
            up += np.concatenate([w_e * (local - x32), [w_e], edge_tiers[e].up_extras(w_e)]).astype(np.float32)
        link.reduced = up
        x_hier, *_ = aggregation_round(link, x_hier, FedAvg(), tier=cloud)
        np.testing.assert_allclose(x_hier, x_flat, rtol=0, atol=1e-5)
        np.testing.assert_allclose(cloud.c, flat_tier.c, rtol=0, atol=1e-4)
    assert np.abs(flat_tier.c).max() > 1e-2  # the control variates moved
    for i in range(len(clients)):
        np.testing.assert_allclose(hier_algo.ci[i], flat_algo.ci[i], rtol=0, atol=1e-4)


def test_scaffold_client_state_round_trips() -> None:
    a = Scaffold(0.1)
    a.receive_down(np.ones(3, dtype=np.float32))
    a.payload(7, np.array([0.1, -0.2, 0.3], dtype=np.float32), 2.0, 4)
    b = Scaffold(0.1)
    b.load_state_dict(a.state_dict())
    assert set(b.ci) == {7} and np.array_equal(b.ci[7], a.ci[7])
    t = a.tier(3, True)
    t.absorb(np.array([1.0, 2.0, 3.0], dtype=np.float32), 2.0)
    u = a.tier(3, True)
    u.load_state_dict(t.state_dict())
    assert np.array_equal(u.c, t.c) and np.array_equal(u.c, [0.5, 1.0, 1.5])


# ---------------------------------------------------------------- FedNova


def _nova_round(steps: list[int], deltas: list[np.ndarray], weights: list[float]) -> np.ndarray:
    algo, d = FedNova(), deltas[0].size
    tier = algo.tier(d, True)
    acc = np.zeros(d + 1 + tier.extra, dtype=np.float32)
    for k, delta, w in zip(steps, deltas, weights):
        sent, extras = algo.payload(0, delta, w, k)
        acc[:d] += w * sent
        acc[d] += w
        acc[d + 1 :] += extras
    new, weight, _, _ = aggregation_round(SumLink(acc), np.zeros(d), FedAvg(), tier=tier)
    assert weight == pytest.approx(sum(weights))
    return new


def test_fednova_equals_fedavg_when_every_client_takes_the_same_steps() -> None:
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=50).astype(np.float32) for _ in range(4)]
    weights = [10.0, 30.0, 5.0, 55.0]
    fedavg = sum(w * d.astype(np.float64) for w, d in zip(weights, deltas)) / sum(weights)
    np.testing.assert_allclose(_nova_round([5, 5, 5, 5], deltas, weights), fedavg, rtol=1e-6, atol=1e-7)


def test_fednova_matches_the_papers_normalised_update_when_steps_differ() -> None:
    rng = np.random.default_rng(1)
    steps = [1, 3, 8, 20]
    deltas = [k * rng.normal(size=50).astype(np.float32) for k in steps]  # more steps, longer deltas
    weights = [10.0, 30.0, 5.0, 55.0]
    got = _nova_round(steps, deltas, weights)
    np.testing.assert_allclose(got, fednova_mean(deltas, weights, steps), rtol=1e-5, atol=1e-6)
    fedavg = sum(w * d.astype(np.float64) for w, d in zip(weights, deltas)) / sum(weights)
    assert np.abs(got - fedavg).max() > 0.1  # FedAvg weights the long-running clients more


# ---------------------------------------------------------------- the wire and the config


def test_extras_follow_the_weighted_delta_in_the_child_buffer_and_fedavg_keeps_its_size() -> None:
    from hierfed.comm.codecs import parse_codec
    from hierfed.comm.links import Child

    none = parse_codec("identity")
    plain = Child(None, none, none, 4, False)
    assert plain._acc.size == 5  # FedAvg: [w*delta, w], nothing more
    child = Child(None, none, none, 4, False, extra=2)
    child.add(0, 2.0, np.ones(4, dtype=np.float32), extras=np.array([1.0, 3.0], dtype=np.float32))
    child.add(1, 1.0, np.full(4, 2.0, dtype=np.float32), extras=np.array([0.5, 0.5], dtype=np.float32))
    np.testing.assert_array_equal(child._acc, [4, 4, 4, 4, 3, 1.5, 3.5])


def test_local_term_corrects_every_gradient() -> None:
    """SCAFFOLD's correction is added to the gradient of every step: with lr·K the update moves by
    exactly −lr·K·correction relative to plain training (SGD is linear in the gradient)."""
    data = _client_data(2)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, batch_size=24, max_grad_norm=None)
    corr = np.array([0.0, 1.0, -2.0, 0.5, 0.0], dtype=np.float32)
    model = Linear(5)
    LocalTrainer(model, cfg).train(data, 1, 0)
    plain = vec(model)
    load(model, np.zeros(5, dtype=np.float32))
    LocalTrainer(model, cfg).train(data, 1, 0, LocalTerm(correction=corr))
    np.testing.assert_allclose(vec(model), plain - 0.1 * corr, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("sets", "topology", "needle"), [
    (["client.algorithm=scaffold", "train.optimizer=sgd", "aggregation.edge.name=median"], "default", "aggregation.edge.name=median"),
    (["client.algorithm=scaffold", "train.optimizer=sgd", "compression.device_up=topk:0.1"], "default", "compression.device_up"),
    (["client.algorithm=fednova", "compression.edge_up=int8"], "default", "compression.edge_up"),
    (["client.algorithm=scaffold", "train.optimizer=sgd", "privacy.clip=1.0"], "default", "privacy"),
    (["client.algorithm=fedprox"], "split-mixed", "device ranks only"),
    (["client.algorithm=scaffold", "train.optimizer=sgd"], "edge-clients", "device ranks only"),
])
def test_impossible_client_combinations_are_refused_before_launch(sets, topology, needle) -> None:
    from hierfed.cluster.preflight import check_supported
    from hierfed.config import load_config
    from hierfed.errors import HierfedError
    from hierfed.topology import load_topology

    with pytest.raises(HierfedError, match=needle) as err:
        check_supported(load_topology(topology).placement(), load_config(None, sets))
    assert "\n" not in str(err.value)


def test_fedprox_and_fedavg_compression_still_pass_preflight() -> None:
    from hierfed.cluster.preflight import check_supported
    from hierfed.config import load_config
    from hierfed.topology import load_topology

    check_supported(load_topology("default").placement(), load_config(None, ["client.algorithm=fedprox", "compression.device_up=topk:0.1"]))
    check_supported(load_topology("default").placement(), load_config(None, ["client.algorithm=scaffold", "train.optimizer=sgd",
                                                                            "aggregation.cloud.name=fedadam"]))


@pytest.mark.parametrize("sets", [["client.algorithm=scaffold"], ["client.algorithm=scaffold", "train.optimizer=sgd", "train.momentum=0.9"],
                                  ["client.algorithm=fedprox", "schedule.normalise=fednova"]])
def test_config_refuses_scaffold_without_plain_sgd_and_two_client_sides(sets) -> None:
    from hierfed.config import load_config
    from hierfed.errors import HierfedError

    with pytest.raises(HierfedError):
        load_config(None, sets)
