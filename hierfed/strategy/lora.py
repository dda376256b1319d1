"""LoRA-aware aggregation helpers on the flat vector: where each adapter's A and B live, and the exact
average of the children's low-rank products, re-factorised to the adapter's rank.

A LoRA module adds s · B A to a frozen weight (B: (out, r), A: (r, in); s = alpha / r, or alpha / √r
with rsLoRA). Averaging A and B separately is not averaging the update: mean(B) mean(A) ≠ mean(B A)
(Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning" (FFA-LoRA), ICLR;
Singhal et al. 2024, "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models"). Two ways out, both here for the wiring to use:

- FFA-LoRA: freeze A (identical at every child), train only B; then mean(B) A = mean(B A) and plain
  averaging is exact. `lora_a_mask` marks the A entries of the flat vector (to keep their update 0).
- Exact aggregation (`aggregate_lora_exact`): for each module, ΔW = Σ w_i B_i A_i / Σ w_i from every
  child's full factors, then its best rank-r approximation (truncated SVD, Eckart-Young) split back
  into factors of the module's own shapes. The product is exact whenever rank(ΔW) <= r (e.g. two
  children whose updates have rank <= r/2, or children that share A); otherwise the part it drops is
  reported as residual energy: Σ dropped σ_k² / Σ σ_k² = ||ΔW - B'A'||_F² / ||ΔW||_F², per module
  and over all modules.

Singular values are split evenly: B' = U_r √S_r, A' = √S_r V_rᵀ, so both factors carry the same
scale in every direction (the product is what matters; the split only changes the next round's local
training dynamics). The scale s is the same constant for every child and for the result, so it
cancels out of ΔW = Σ w_i s B_i A_i / Σ w_i and is left out here. Entries that are not LoRA factors
(a classifier head, biases, DoRA's magnitude) get the plain weighted mean.

Cost per module, with n children of rank r: ΔW is never formed. With B_s = [w_1 B_1 … w_n B_n] / Σw
(out, n r) and A_s = [A_1; …; A_n] (n r, in), ΔW = B_s A_s = Q_B (R_B R_Aᵀ) Q_Aᵀ from two thin QRs
(B_s = Q_B R_B, A_sᵀ = Q_A R_A), and the SVD is of the small (n r × n r) core: O((out + in) (n r)²)
flops and O((out + in) n r) memory per module.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import numpy as np

# PEFT names: "<module>.lora_A.<adapter>.weight" (Linear, Conv: nn.Module weights) and
# "<module>.lora_embedding_A.<adapter>" (Embedding: bare Parameters); likewise B.
_LORA_NAME = re.compile(r"^(?P<module>.+)\.lora_(?P<embedding>embedding_)?(?P<factor>[AB])\.(?P<adapter>[^.]+)(?P<weight>\.weight)?$")


@dataclass(frozen=True)
class LoraModule:
    """One adapter's factors in the flat vector: A (r, in...) at a_slice, B (out, r, 1...) at b_slice."""

    name: str  # the module's path and adapter, e.g. "base_model.model....query[default]"
    rank: int
    a_slice: slice
    a_shape: tuple[int, ...]
    b_slice: slice
    b_shape: tuple[int, ...]

    @property
    def in_features(self) -> int:
        return int(np.prod(self.a_shape[1:]))

    @property
    def out_features(self) -> int:
        return self.b_shape[0]


def _offsets(manifest: list[tuple[str, tuple[int, ...]]]) -> list[slice]:
    sizes = [int(np.prod(shape)) for _, shape in manifest]  # np.prod(()) = 1: a scalar parameter
    ends = np.cumsum([0, *sizes])
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(ends)]


def lora_modules(manifest: list[tuple[str, tuple[int, ...]]]) -> list[LoraModule]:
    """The LoRA modules of a flat vector, in manifest order (FlatView.manifest(): (name, shape) pairs).

    Every lora_A needs its lora_B and the other way round, with A (r, ...) and B (out, r, 1, ...)."""
    found: dict[str, dict[str, tuple[slice, tuple[int, ...]]]] = {}
    for (name, shape), where in zip(manifest, _offsets(manifest)):
        m = _LORA_NAME.match(name)
        if m:
            key = f"{m['module']}[{m['adapter']}]" + (" (embedding)" if m["embedding"] else "")
            found.setdefault(key, {})[m["factor"]] = (where, tuple(int(d) for d in shape))
    modules = []
    for key, parts in found.items():
        if set(parts) != {"A", "B"}:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise ValueError(f"LoRA module {key} has no {missing} in the flat vector (frozen? then it is not a pair to aggregate)")
        (a_slice, a_shape), (b_slice, b_shape) = parts["A"], parts["B"]
        rank = a_shape[0] if len(a_shape) >= 2 else -1
        if len(a_shape) < 2 or len(b_shape) < 2 or b_shape[1] != rank or int(np.prod(b_shape[2:])) != 1:
            raise ValueError(f"LoRA module {key}: lora_A {a_shape} and lora_B {b_shape} are not (r, in) and (out, r)")
        modules.append(LoraModule(key, rank, a_slice, a_shape, b_slice, b_shape))
    return modules


def lora_a_mask(manifest: list[tuple[str, tuple[int, ...]]]) -> np.ndarray:
    """A boolean vector over the flat vector: True at every lora_A entry (what FFA-LoRA keeps frozen)."""
    where = _offsets(manifest)
    mask = np.zeros(where[-1].stop if where else 0, dtype=bool)
    for module in lora_modules(manifest):
        mask[module.a_slice] = True
    return mask


def factors(flat: np.ndarray, module: LoraModule) -> tuple[np.ndarray, np.ndarray]:
    """(B as (out, r), A as (r, in)) of one module, views into `flat` (conv kernels flattened into in)."""
    return flat[module.b_slice].reshape(module.out_features, module.rank), flat[module.a_slice].reshape(module.rank, module.in_features)


@dataclass
class LoraAggregate:
    """The exact-aggregation result: the new flat vector and what the rank-r truncation dropped."""

    params: np.ndarray  # float64, the full new vector (factors re-factorised, other entries averaged)
    dropped: dict[str, float] = field(default_factory=dict)  # per module: Σ dropped σ²
    energy: dict[str, float] = field(default_factory=dict)  # per module: Σ σ² = ||ΔW||_F²

    def residual(self, module: str) -> float:
        """Fraction of the module's ||ΔW||_F² the truncation dropped (0 when ΔW = 0)."""
        return self.dropped[module] / self.energy[module] if self.energy[module] > 0 else 0.0

    @property
    def residuals(self) -> dict[str, float]:
        return {name: self.residual(name) for name in self.energy}

    @property
    def residual_total(self) -> float:
        """Fraction of Σ_modules ||ΔW||_F² dropped over all modules."""
        energy = sum(self.energy.values())
        return sum(self.dropped.values()) / energy if energy > 0 else 0.0


def refactorise(bs: list[np.ndarray], as_: list[np.ndarray], weights: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best rank-`rank` factors (B', A') of Σ w_i B_i A_i / Σ w_i, and all its singular values (descending).

    B' = U √S, A' = √S Vᵀ over the top `rank` singular triplets; zero columns/rows where ΔW has fewer."""
    total = float(np.sum(weights))
    b_stack = np.concatenate([b * (w / total) for b, w in zip(bs, weights)], axis=1)  # (out, n r)
    a_stack = np.concatenate(as_, axis=0)  # (n r, in)
    q_b, r_b = np.linalg.qr(b_stack)  # thin: (out, k_b), (k_b, n r)
    q_a, r_a = np.linalg.qr(a_stack.T)  # (in, k_a), (k_a, n r)
    u_core, sigma, vt_core = np.linalg.svd(r_b @ r_a.T, full_matrices=False)  # ΔW = q_b (r_b r_aᵀ) q_aᵀ
    keep = min(rank, sigma.size)
    root = np.sqrt(sigma[:keep])
    b_new = np.zeros((b_stack.shape[0], rank))
    a_new = np.zeros((rank, a_stack.shape[1]))
    b_new[:, :keep] = (q_b @ u_core[:, :keep]) * root
    a_new[:keep] = root[:, None] * (vt_core[:keep] @ q_a.T)
    return b_new, a_new, sigma


def aggregate_lora_exact(
    updates: np.ndarray, weights, manifest: list[tuple[str, tuple[int, ...]]], base: np.ndarray | None = None
) -> LoraAggregate:
    """Exact LoRA aggregation of every child's vector: `updates` (n, dim) are full vectors, or deltas
    from `base` when given (child i holds base + updates[i]). Children of weight 0 are left out.

    LoRA factors: the rank-r re-factorisation of Σ w_i B_i A_i / Σ w_i; other entries: the weighted
    mean. Returns the new full vector (float64) with the energy each module's truncation dropped."""
    weights = np.asarray(weights, dtype=np.float64)
    dim = _offsets(manifest)[-1].stop if manifest else 0
    if updates.ndim != 2 or updates.shape[1] != dim or weights.shape != (updates.shape[0],):
        raise ValueError(f"need updates (n, {dim}) and n weights, got shapes {updates.shape} and {weights.shape}")
    if base is not None and base.shape != (dim,):
        raise ValueError(f"base must be a vector of size {dim}, got shape {base.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0, with a positive total; got {weights}")
    active = np.flatnonzero(weights > 0)
    w = weights[active]
    params = np.zeros(dim, dtype=np.float64)  # the plain weighted mean first (row by row: O(dim) extra)
    for i, wi in zip(active, w):
        params += wi * updates[i].astype(np.float64, copy=False)
    params /= w.sum()
    if base is not None:
        params += base
    result = LoraAggregate(params)
    for module in lora_modules(manifest):
        bs, as_ = [], []
        base_b, base_a = factors(base, module) if base is not None else (0.0, 0.0)
        for i in active:
            b, a = factors(updates[i], module)  # views of this module's entries only
            bs.append(base_b + b.astype(np.float64))
            as_.append(base_a + a.astype(np.float64))
        b_new, a_new, sigma = refactorise(bs, as_, w, module.rank)
        params[module.b_slice] = b_new.reshape(-1)
        params[module.a_slice] = a_new.reshape(-1)
        energy = sigma**2
        result.energy[module.name] = float(energy.sum())
        result.dropped[module.name] = float(energy[module.rank:].sum())
    return result
