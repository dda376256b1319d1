"""The client side of an algorithm, and the extra values that travel with the model delta.

A `Strategy` is the server step of one tier over the SUM-reduced [w·Δ, w]. A `ClientAlgorithm`
is the part chosen once for the run (`client.algorithm`, docs/aggregation.md) that the roles ask,
without knowing which algorithm it is:

  device (per client)  `local_term(c)`: what the local objective adds (FedProx's μ/2‖w − w_start‖²)
                       or every gradient gets (SCAFFOLD's c − c_i): a `LocalTerm`, applied by
                       hierfed.training.local after each backward; None for plain local training.
                       `payload(c, delta, weight, steps)`: (the delta to send, the extra values
                       that travel with it, already summable, or None).
  every link up        `up_size(dim, from_devices)`: how many extra float32 values follow [w·Δ, w]
                       in a contribution on that link (devices → their parent, or edges → the
                       cloud): the contribution is [w·Δ, w, extras], one SUM-Reduce, counted in
                       the byte ledger like the rest. 0 for FedAvg: the buffer is exactly [w·Δ, w].
  down, per cloud round `down_size(dim)`: values the cloud broadcasts (and an edge forwards) to its
                       children once per cloud round (SCAFFOLD's server control variate); 0: none.
  parent (edge/cloud)  `tier(dim, from_devices)`: a `Tier`, the parent's side: `divisor(total,
                       extras)` (what Σw·Δ is divided by: FedNova's normalisation), `absorb(extras,
                       total)` (server state from the summed extras), `up_extras(weight)` (an edge's
                       extras for its own contribution to the cloud), `down()`, state for checkpoints.

Pure numpy: the torch side of a `LocalTerm` is hierfed.training.local.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LocalTerm:
    """What a client's local training adds to every gradient, after backward and before clipping:
    mu · (w − w_start) (the gradient of the proximal term μ/2‖w − w_start‖², FedProx) when `mu` is
    set, and the constant `correction` (flat, float32; SCAFFOLD's c − c_i) when set."""

    mu: float | None = None
    correction: np.ndarray | None = None


class Tier:
    """A parent's side of a client algorithm: nothing (FedAvg, FedProx)."""

    extra = 0  # extra values per contribution on the link into this parent
    fraction = 1.0  # participating share of this parent's children this round (set by the role)

    def divisor(self, total: float, extras: np.ndarray) -> float:
        """What the parent divides Σ w·Δ by to get the mean delta: Σ w (FedAvg)."""
        return total

    def absorb(self, extras: np.ndarray, total: float) -> None:  # noqa: B027 (no state by default)
        """The summed extras of one aggregation round (total: Σ w), into the parent's state."""

    def up_extras(self, weight: float) -> np.ndarray | None:
        """An edge's extras for its one contribution to the cloud per cloud round (weight: its W_e)."""
        return None

    def down(self) -> np.ndarray | None:
        """What this parent broadcasts to its children once per cloud round (None: nothing)."""
        return None

    def set_down(self, values: np.ndarray) -> None:  # noqa: B027
        """An edge: what the cloud broadcast (`down`), to forward to its devices."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:  # noqa: B027
        pass


class ClientAlgorithm:
    """Plain local training (FedAvg's client): no term, no extras, no state."""

    name = "none"

    def up_size(self, dim: int, from_devices: bool) -> int:
        return 0

    def down_size(self, dim: int) -> int:
        return 0

    def local_term(self, client: int) -> LocalTerm | None:
        return None

    def payload(self, client: int, delta: np.ndarray, weight: float, steps: int) -> tuple[np.ndarray, np.ndarray | None]:
        return delta, None

    def receive_down(self, values: np.ndarray) -> None:  # noqa: B027
        """A device: the values its parent broadcast (`down_size` of them) this cloud round."""

    def tier(self, dim: int, from_devices: bool) -> Tier:
        return Tier()

    @property
    def stateful(self) -> bool:
        """A device rank keeps state for its clients (checkpointed with the rank)."""
        return False

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:  # noqa: B027
        pass


class FedProx(ClientAlgorithm):
    """FedProx (Li et al. 2020): each client minimises f_i(w) + μ/2‖w − w_start‖², w_start the
    parameters it received. μ = 0 is FedAvg's client exactly (the term adds 0 · (w − w_start))."""

    name = "fedprox"

    def __init__(self, mu: float) -> None:
        self.mu = float(mu)

    def local_term(self, client: int) -> LocalTerm:
        return LocalTerm(mu=self.mu)


class FedNova(ClientAlgorithm):
    """FedNova (Wang et al. 2020) with plain local SGD (a_i = τ_i): client i sends d_i = Δ_i / τ_i
    and the extra value w_i τ_i; the parent's mean delta is τ_eff Σ w_i d_i / Σ w_i with
    τ_eff = Σ w_i τ_i / Σ w_i, i.e. Σ w_i d_i divided by (Σ w_i)² / Σ w_i τ_i. It normalises at the
    tier whose children are devices (the edges; a flat cloud); edges send the cloud their plain
    change (FedAvg of the edges)."""

    name = "fednova"

    def up_size(self, dim: int, from_devices: bool) -> int:
        return 1 if from_devices else 0

    def payload(self, client: int, delta: np.ndarray, weight: float, steps: int) -> tuple[np.ndarray, np.ndarray | None]:
        return delta / np.float32(steps), np.array([weight * steps], dtype=np.float32)

    def tier(self, dim: int, from_devices: bool) -> Tier:
        return NovaTier() if from_devices else Tier()


class NovaTier(Tier):
    extra = 1

    def divisor(self, total: float, extras: np.ndarray) -> float:
        steps = float(extras[0])  # Σ w_i τ_i
        return total * total / steps if steps > 0 else total


def fednova_mean(deltas: list[np.ndarray], weights: list[float], steps: list[int]) -> np.ndarray:
    """Reference: the paper's normalised update τ_eff Σ p_i Δ_i / τ_i, p_i = w_i / Σ w (float64)."""
    w = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    tau_eff = float(np.dot(w, steps))
    return tau_eff * sum(p * d.astype(np.float64) / k for p, d, k in zip(w, deltas, steps))


class Scaffold(ClientAlgorithm):
    """SCAFFOLD (Karimireddy et al. 2020), option II. Client i keeps c_i (float32, zeros at first)
    on its device rank; every local step uses the gradient + (c − c_i), c the cloud's control
    variate (broadcast once per cloud round). After K local steps of rate η from x to y_i:
    c_i⁺ = c_i − c + (x − y_i) / (K η), and Δc_i = c_i⁺ − c_i travels as w_i·Δc_i after w_i·Δ_i.
    A parent keeps its own control variate (`ControlVariate`); how they compose over two tiers is
    in docs/aggregation.md. `lr`: the local SGD rate η."""

    name = "scaffold"

    def __init__(self, lr: float) -> None:
        self.lr = float(lr)
        self.c: np.ndarray | None = None  # the cloud's control variate, as last received
        self.ci: dict[int, np.ndarray] = {}

    def up_size(self, dim: int, from_devices: bool) -> int:
        return dim

    def down_size(self, dim: int) -> int:
        return dim

    def receive_down(self, values: np.ndarray) -> None:
        self.c = np.array(values, dtype=np.float32)

    def _ci(self, client: int, dim: int) -> np.ndarray:
        return self.ci.get(client, np.zeros(dim, dtype=np.float32))

    def local_term(self, client: int) -> LocalTerm:
        assert self.c is not None, "SCAFFOLD: no control variate received before training"
        return LocalTerm(correction=self.c - self._ci(client, self.c.size))

    def payload(self, client: int, delta: np.ndarray, weight: float, steps: int) -> tuple[np.ndarray, np.ndarray | None]:
        old = self._ci(client, delta.size)
        new = old - self.c - delta / np.float32(steps * self.lr)  # (x − y_i) = −Δ_i
        self.ci[client] = new.astype(np.float32)
        return delta, (np.float32(weight) * (self.ci[client] - old)).astype(np.float32)

    def tier(self, dim: int, from_devices: bool) -> Tier:
        return ControlVariate(dim)

    @property
    def stateful(self) -> bool:
        return True

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"ci/{c}": v for c, v in self.ci.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.ci = {int(k.split("/", 1)[1]): np.array(v, dtype=np.float32) for k, v in state.items() if k.startswith("ci/")}


class ControlVariate(Tier):
    """SCAFFOLD at a parent: its control variate c (float64), the weighted mean of its children's:
    after each aggregation round c += fraction · Σ w_i Δc_i / Σ w_i. An edge sends the cloud
    W_e · (its change of c over the cloud round) with its model change, so the cloud's c is the mean
    of the edges' (and, under full participation, of every client's c_i). `down()`: the cloud's c,
    which an edge receives (`set_down`) and forwards to its devices."""

    def __init__(self, dim: int) -> None:
        self.extra = dim
        self.c = np.zeros(dim, dtype=np.float64)
        self.start = self.c.copy()  # c at the start of this cloud round (an edge's report)
        self.root: np.ndarray | None = None  # an edge: the cloud's c this cloud round

    def absorb(self, extras: np.ndarray, total: float) -> None:
        if total > 0:
            self.c += (self.fraction / total) * extras.astype(np.float64)

    def up_extras(self, weight: float) -> np.ndarray:
        out = (weight * (self.c - self.start)).astype(np.float32)
        self.start[:] = self.c
        return out

    def down(self) -> np.ndarray:
        return (self.c if self.root is None else self.root).astype(np.float32)

    def set_down(self, values: np.ndarray) -> None:
        self.root = np.array(values, dtype=np.float32)
        self.start[:] = self.c  # a new cloud round

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"c": self.c.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if "c" in state:
            self.c = np.array(state["c"], dtype=np.float64)
            self.start = self.c.copy()


CLIENT_ALGORITHMS = ("none", "fedprox", "scaffold", "fednova")


def build_client(cfg) -> ClientAlgorithm:
    """The run's client algorithm from its RunConfig: `client.algorithm`, or FedNova when
    schedule.normalise is fednova (the same normalisation, configured where partial work is)."""
    name = cfg.client.algorithm
    if name == "none" and cfg.schedule.normalise == "fednova":
        name = "fednova"
    if name == "fedprox":
        return FedProx(cfg.client.mu)
    if name == "scaffold":
        return Scaffold(cfg.train.lr)
    if name == "fednova":
        return FedNova()
    return ClientAlgorithm()
