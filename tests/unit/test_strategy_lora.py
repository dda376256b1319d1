"""LoRA helpers: factor slices from a PEFT manifest, and exact aggregation of B·A checked against dense numpy.

PEFT multiplies B·A by a constant scale (alpha / r): it is the same for every child and the result, so
it cancels out of every equality below and is left out.
"""

from __future__ import annotations

import numpy as np
import pytest

from hierfed.strategy.lora import aggregate_lora_exact, lora_a_mask, lora_modules

P = "base_model.model.bert.encoder.layer.0.attention.self"
# A BERT-like manifest as FlatView.manifest() gives it (peft 0.21 names): two Linear adapters of rank 4,
# an embedding adapter of rank 2, a conv adapter of rank 2, and a trained classifier that is not LoRA.
MANIFEST = [
    ("base_model.model.bert.embeddings.word_embeddings.lora_embedding_A.default", (2, 11)),
    ("base_model.model.bert.embeddings.word_embeddings.lora_embedding_B.default", (6, 2)),
    (f"{P}.query.lora_A.default.weight", (4, 6)),
    (f"{P}.query.lora_B.default.weight", (6, 4)),
    (f"{P}.value.lora_A.default.weight", (4, 6)),
    (f"{P}.value.lora_B.default.weight", (5, 4)),
    ("base_model.model.conv.lora_A.default.weight", (2, 3, 2, 2)),
    ("base_model.model.conv.lora_B.default.weight", (7, 2, 1, 1)),
    ("base_model.model.classifier.modules_to_save.default.weight", (3, 6)),
    ("base_model.model.classifier.modules_to_save.default.bias", (3,)),
]
# Offsets by hand: 22, 12, 24, 24, 24, 20, 24, 14, 18, 3
STARTS = [0, 22, 34, 58, 82, 106, 126, 150, 164, 182]
DIM = 185
# (A index, B index, rank, out, in) per module in the manifest above
MODULES = [(0, 1, 2, 6, 11), (2, 3, 4, 6, 6), (4, 5, 4, 5, 6), (6, 7, 2, 7, 12)]


def piece(flat: np.ndarray, k: int) -> np.ndarray:
    end = STARTS[k + 1] if k + 1 < len(STARTS) else DIM
    return flat[STARTS[k]:end]


def product(flat: np.ndarray, a: int, b: int, r: int, out: int, in_: int) -> np.ndarray:
    return piece(flat, b).reshape(out, r) @ piece(flat, a).reshape(r, in_)


def test_modules_and_slices_from_the_manifest() -> None:
    mods = lora_modules(MANIFEST)
    assert [m.rank for m in mods] == [2, 4, 4, 2]
    assert [(m.out_features, m.in_features) for m in mods] == [(6, 11), (6, 6), (5, 6), (7, 12)]
    assert mods[1].name == f"{P}.query[default]"
    for m, (a, b, *_rest) in zip(mods, MODULES):
        assert (m.a_slice.start, m.a_slice.stop) == (STARTS[a], STARTS[a + 1])
        assert (m.b_slice.start, m.b_slice.stop) == (STARTS[b], STARTS[b + 1])
    mask = lora_a_mask(MANIFEST)
    assert mask.size == DIM and mask.sum() == 22 + 24 + 24 + 24
    expected = np.zeros(DIM, dtype=bool)
    for a, *_ in MODULES:
        expected[STARTS[a]:STARTS[a + 1]] = True
    np.testing.assert_array_equal(mask, expected)


def test_unpaired_or_misshapen_factors_are_refused() -> None:
    with pytest.raises(ValueError, match=r"query\[default\] has no lora_B"):
        lora_modules([(f"{P}.query.lora_A.default.weight", (4, 6))])
    with pytest.raises(ValueError, match=r"are not \(r, in\) and \(out, r\)"):
        lora_modules([(f"{P}.query.lora_A.default.weight", (4, 6)), (f"{P}.query.lora_B.default.weight", (6, 3))])
    assert lora_modules([("classifier.weight", (3, 6))]) == []


def dense_mean(children: np.ndarray, w: np.ndarray, module) -> np.ndarray:
    """Σ w_i B_i A_i / Σ w_i, formed densely."""
    return sum(wi * product(c, *module) for c, wi in zip(children, w)) / w.sum()


def children_with_rank(n: int, cap: list[int], seed: int, shared_a: bool = False) -> np.ndarray:
    """n full flat vectors; in module k, child i's B_i A_i has rank <= cap[k] (the other factor rows/columns zero)."""
    rng = np.random.default_rng(seed)
    out = rng.standard_normal((n, DIM))
    for (a, b, r, o, i_), c in zip(MODULES, cap):
        for child in out:
            piece(child, a).reshape(r, i_)[c:] = 0.0
            piece(child, b).reshape(o, r)[:, c:] = 0.0
        if shared_a:
            for child in out[1:]:
                piece(child, a)[:] = piece(out[0], a)
    return out


def test_exact_when_the_rank_allows_it() -> None:
    """Two children with half-rank updates: ΔW has rank <= r, the re-factorised product is the exact mean."""
    children = children_with_rank(2, [1, 2, 2, 1], seed=1)
    w = np.array([3.0, 1.0])
    agg = aggregate_lora_exact(children, w, MANIFEST)
    naive = (w[:, None] * children).sum(0) / w.sum()
    for module in MODULES:
        exact = dense_mean(children, w, module)
        np.testing.assert_allclose(product(agg.params, *module), exact, rtol=0, atol=1e-12)
        gap = np.linalg.norm(product(naive, *module) - exact) / np.linalg.norm(exact)
        assert gap > 0.1  # averaging A and B separately is not averaging B·A
    assert agg.residual_total < 1e-24 and max(agg.residuals.values()) < 1e-24
    np.testing.assert_allclose(agg.params[STARTS[8]:], naive[STARTS[8]:], rtol=1e-15)  # the classifier: plain weighted mean


def test_exact_with_a_shared_a_and_ffa_plain_averaging_agrees() -> None:
    """Children that share A (FFA-LoRA: A frozen): mean(B)·A is exact, and so is the re-factorisation."""
    children = children_with_rank(4, [2, 4, 4, 2], seed=2, shared_a=True)
    w = np.array([1.0, 2.0, 3.0, 4.0])
    agg = aggregate_lora_exact(children, w, MANIFEST)
    plain = (w[:, None] * children).sum(0) / w.sum()
    for module in MODULES:
        exact = dense_mean(children, w, module)
        np.testing.assert_allclose(product(agg.params, *module), exact, rtol=0, atol=1e-12)
        np.testing.assert_allclose(product(plain, *module), exact, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(lora_a_mask(MANIFEST) & (children[0] != children[1]), False)  # only B differs
    assert agg.residual_total < 1e-24


def test_truncation_is_the_best_rank_r_approximation() -> None:
    """Full-rank children: the product is ΔW's best rank-r approximation (dense SVD here), residual = dropped σ² / Σ σ²."""
    children = np.random.default_rng(3).standard_normal((3, DIM))
    w = np.array([2.0, 5.0, 1.0])
    agg = aggregate_lora_exact(children, w, MANIFEST)
    dropped = energy = 0.0
    for module, mod in zip(MODULES, lora_modules(MANIFEST)):
        r = module[2]
        u, s, vt = np.linalg.svd(dense_mean(children, w, module))
        best = (u[:, :r] * s[:r]) @ vt[:r]
        np.testing.assert_allclose(product(agg.params, *module), best, rtol=0, atol=1e-12)
        assert agg.residual(mod.name) == pytest.approx(np.sum(s[r:] ** 2) / np.sum(s**2), rel=1e-10)
        assert agg.residual(mod.name) > 1e-4  # something was dropped: the test is not the exact case
        dropped, energy = dropped + np.sum(s[r:] ** 2), energy + np.sum(s**2)
    assert agg.residual_total == pytest.approx(dropped / energy, rel=1e-10)


def test_singular_values_split_evenly_between_b_and_a() -> None:
    children = np.random.default_rng(4).standard_normal((3, DIM))
    agg = aggregate_lora_exact(children, np.ones(3), MANIFEST)
    for a, b, r, o, i_ in MODULES:
        bn, an = piece(agg.params, b).reshape(o, r), piece(agg.params, a).reshape(r, i_)
        np.testing.assert_allclose(bn.T @ bn, an @ an.T, atol=1e-12)  # both diag(σ_1..σ_r)
        np.testing.assert_allclose(bn.T @ bn, np.diag(np.diag(bn.T @ bn)), atol=1e-12)


def test_residual_energy_by_hand() -> None:
    # One module, r = 1, out 3, in 4. Child 1: B = [2, 0, 0]ᵀ, A = [1, 0, 0, 0]; child 2: B = [0, 1, 0]ᵀ, A = [0, 1, 0, 0];
    # weights 1, 1: ΔW = (2 e1 f1ᵀ + e2 f2ᵀ) / 2 = e1 f1ᵀ + 0.5 e2 f2ᵀ: σ = 1, 0.5. Rank 1 keeps e1 f1ᵀ and
    # drops 0.5² = 0.25 of 1² + 0.5² = 1.25: residual 0.2.
    manifest = [("m.lora_A.default.weight", (1, 4)), ("m.lora_B.default.weight", (3, 1))]
    children = np.array([[1, 0, 0, 0, 2, 0, 0], [0, 1, 0, 0, 0, 1, 0]], dtype=np.float32)
    agg = aggregate_lora_exact(children, [1.0, 1.0], manifest)
    assert agg.energy["m[default]"] == pytest.approx(1.25) and agg.dropped["m[default]"] == pytest.approx(0.25)
    assert agg.residual("m[default]") == pytest.approx(0.2) and agg.residual_total == pytest.approx(0.2)
    b, a = agg.params[4:].reshape(3, 1), agg.params[:4].reshape(1, 4)
    np.testing.assert_allclose(b @ a, [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], atol=1e-15)
    np.testing.assert_allclose(np.abs(b.ravel()), [1, 0, 0], atol=1e-15)  # √σ = 1 on each side
    np.testing.assert_allclose(np.abs(a.ravel()), [1, 0, 0, 0], atol=1e-15)


def test_deltas_from_a_base_equal_full_vectors_and_zero_weights_are_left_out() -> None:
    rng = np.random.default_rng(5)
    base = rng.standard_normal(DIM)
    children = rng.standard_normal((4, DIM))
    w = np.array([1.0, 0.0, 2.0, 3.0])
    full = aggregate_lora_exact(children, w, MANIFEST)
    from_base = aggregate_lora_exact(children - base, w, MANIFEST, base=base)
    without = aggregate_lora_exact(children[w > 0], w[w > 0], MANIFEST)
    for module in MODULES:
        np.testing.assert_allclose(product(from_base.params, *module), product(full.params, *module), atol=1e-12)
        np.testing.assert_allclose(product(without.params, *module), product(full.params, *module), atol=1e-12)
    np.testing.assert_allclose(from_base.params[STARTS[8]:], full.params[STARTS[8]:], atol=1e-12)
    assert from_base.residuals == pytest.approx(full.residuals)
    with pytest.raises(ValueError, match="positive total"):
        aggregate_lora_exact(children, np.zeros(4), MANIFEST)
