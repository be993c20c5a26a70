"""Approximate matrix multiplication: nqlib.inner_products and nqlib.matmul_distortion.

* the product formed in the rotated domain equals the product of the
  dequantized matrices (to rounding), for every method and pipeline, and
  mixed pairs fall back to dequantizing;
* bad pairs are refused with a ValueError;
* on iid Gaussian data the gap to the lower bound, rate - Gamma^{-1}(D), is
  small (issue 5's targets, at a smaller size);
* the universal ingredients matter on adversarial data: centering on
  columns with a common offset, the rotation on spiky columns.
"""

import numpy as np
import pytest

import nqlib
from nqlib.theory import gap_bits

PIPELINES = {
    "nested-variable": dict(method="nested", mode="variable"),
    "nested-fixed": dict(method="nested", mode="fixed"),
    "nested-dither": dict(method="nested", dither=True),
    "nested-unbiased": dict(method="nested", estimator="unbiased"),
    "nested-uncentred": dict(method="nested", center=False),
    "nested-unrotated": dict(method="nested", rotate=False),
    "nested-unnormalised": dict(method="nested", normalize=False),
    "nested-raw": dict(method="nested", center=False, normalize=False,
                       rotate=False),
    "ecsq": dict(method="ecsq"),
    "rtn": dict(method="rtn", group_size=32),
    "rtn-hadamard": dict(method="rtn-hadamard", group_size=32),
}


def gaussian(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


def dequantized_product(QA, QB):
    return QA.dequantize().T @ QB.dequantize()


def assert_close_rel(C, ref, rtol=1e-9):
    err = np.linalg.norm(C - ref) / np.linalg.norm(ref)
    assert err <= rtol, err


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("n", [256, 100])
def test_equals_product_of_dequantized(pipeline, n):
    kw = PIPELINES[pipeline]
    A = gaussian((n, 12), 1) + 0.5
    B = gaussian((n, 7), 2) - 0.25
    QA = nqlib.quantize(A, 6, seed=5, **kw)
    QB = nqlib.quantize(B, 6, seed=5, **kw)
    C = nqlib.inner_products(QA, QB)
    assert C.shape == (12, 7) and C.dtype == np.float64
    assert_close_rel(C, dequantized_product(QA, QB))
    # and it estimates A^T B (small matrices: the side information costs
    # 1-3 of the 6 bits per entry)
    assert nqlib.matmul_distortion(A, B, C) < 0.05


@pytest.mark.parametrize("mode", ["variable", "fixed"])
@pytest.mark.parametrize("rate", [0.5, 1.0])
def test_low_rates_equal_product_of_dequantized(mode, rate):
    """Below about one bit per entry only part of each rotated vector is
    coded (sketching); the product is still that of the reconstructions."""
    A, B = gaussian((1024, 16), 7), gaussian((1024, 8), 8)
    QA = nqlib.quantize(A, rate, seed=2, mode=mode)
    QB = nqlib.quantize(B, rate, seed=2, mode=mode)
    C = nqlib.inner_products(QA, QB)
    assert_close_rel(C, dequantized_product(QA, QB))
    assert nqlib.matmul_distortion(A, B, C) < 1.0


def test_inner_product_of_two_vectors():
    a = gaussian((1024, 1), 3)
    b = a + 0.1 * gaussian((1024, 1), 4)
    Qa = nqlib.quantize(a, 6, seed=1)
    Qb = nqlib.quantize(b, 6, seed=1)
    C = nqlib.inner_products(Qa, Qb)
    assert C.shape == (1, 1)
    assert_close_rel(C, dequantized_product(Qa, Qb))
    assert abs(C[0, 0] - float(a[:, 0] @ b[:, 0])) < 0.01 * float(a[:, 0] @ b[:, 0])


@pytest.mark.parametrize("left,right", [
    ("nested-variable", "rtn"),
    ("rtn-hadamard", "nested-fixed"),
    ("nested-variable", "ecsq"),  # n' = 104 (E8 padding) against n = 100
    ("nested-variable", "nested-uncentred"),
    ("nested-unrotated", "nested-variable"),
    ("nested-variable", "nested-fixed"),
    ("nested-dither", "nested-unbiased"),
    ("nested-unnormalised", "nested-variable"),
    ("rtn", "rtn-hadamard"),
])
def test_mixed_pipelines(left, right):
    A = gaussian((100, 6), 5) + 1.0
    B = gaussian((100, 4), 6)
    QA = nqlib.quantize(A, 6, seed=9, **PIPELINES[left])
    QB = nqlib.quantize(B, 6, seed=9, **PIPELINES[right])
    C = nqlib.inner_products(QA, QB)
    assert_close_rel(C, dequantized_product(QA, QB))
    assert nqlib.matmul_distortion(A, B, C) < 0.05


def test_unrotated_operands_may_use_different_seeds():
    A, B = gaussian((128, 3), 7), gaussian((128, 2), 8)
    for kw in (PIPELINES["rtn"], PIPELINES["nested-unrotated"]):
        QA = nqlib.quantize(A, 4, seed=1, **kw)
        QB = nqlib.quantize(B, 4, seed=2, **kw)
        assert_close_rel(nqlib.inner_products(QA, QB), dequantized_product(QA, QB))


def test_inner_dimension_mismatch():
    QA = nqlib.quantize(gaussian((128, 3), 1), 4)
    QB = nqlib.quantize(gaussian((136, 3), 2), 4)
    with pytest.raises(ValueError, match="inner dimensions differ.*128.*136"):
        nqlib.inner_products(QA, QB)


@pytest.mark.parametrize("left,right", [("nested-variable", "nested-variable"),
                                        ("nested-fixed", "ecsq"),
                                        ("rtn-hadamard", "nested-variable")])
def test_rotated_operands_need_the_same_seed(left, right):
    QA = nqlib.quantize(gaussian((128, 3), 1), 4, seed=1, **PIPELINES[left])
    QB = nqlib.quantize(gaussian((128, 3), 2), 4, seed=2, **PIPELINES[right])
    with pytest.raises(ValueError, match="different seeds"):
        nqlib.inner_products(QA, QB)


@pytest.mark.parametrize("bad", ["QA", "QB"])
def test_arguments_must_be_quantized_matrices(bad):
    A = gaussian((128, 3), 1)
    Q = nqlib.quantize(A, 4)
    args = {"QA": Q, "QB": Q}
    for other in (A, A.tolist(), None, Q.to_bytes()):
        args[bad] = other
        with pytest.raises(ValueError, match=f"{bad} must be a QuantizedMatrix"):
            nqlib.inner_products(args["QA"], args["QB"])


def test_matmul_distortion():
    A, B = gaussian((64, 5), 1), gaussian((64, 3), 2)
    C = A.T @ B
    assert nqlib.matmul_distortion(A, B, C) == 0.0
    E = gaussian((5, 3), 3)
    expected = float((E * E).sum() / (64 * 5 * 3))
    assert np.isclose(nqlib.matmul_distortion(A, B, C + E), expected, rtol=1e-12)
    # D = 1 for C_hat = 0 on iid N(0, 1) data, in expectation (7% std here)
    big_A, big_B = gaussian((512, 40), 4), gaussian((512, 40), 5)
    assert abs(nqlib.matmul_distortion(big_A, big_B, np.zeros((40, 40))) - 1) < 0.2
    with pytest.raises(ValueError, match="same number of rows"):
        nqlib.matmul_distortion(A, gaussian((63, 3), 4), C)
    with pytest.raises(ValueError, match="C_hat must have shape"):
        nqlib.matmul_distortion(A, B, C.T)


# ----------------------------------------------------- quality targets
# n = 2048, a = b = 64. Over seeds 0..9 the gap of one product had mean /
# standard deviation 0.178 / 0.015 bit (variable, R = 3), 0.180 / 0.024
# (variable, R = 4) and 0.381 / 0.017 (fixed, R = 4). The gap of the mean
# distortion over SEEDS = 4 products has about half that spread, so the
# thresholds sit 3 or more standard deviations above the means. The side
# information costs 64 / 2048 = 0.03 bit per entry here against 0.016 at the
# benchmark's n = 4096, which is why they exceed the benchmark's targets
# (0.20, 0.40).
N, A_COLS, B_COLS, SEEDS = 2048, 64, 64, 4


def measured_gap(rate, seed, **kw):
    """(gap, bits, D) of one product of seeded Gaussian matrices."""
    A = gaussian((N, A_COLS), 2 * seed)
    B = gaussian((N, B_COLS), 2 * seed + 1)
    QA = nqlib.quantize(A, rate, seed=seed, **kw)
    QB = nqlib.quantize(B, rate, seed=seed, **kw)
    D = nqlib.matmul_distortion(A, B, nqlib.inner_products(QA, QB))
    bits = max(QA.bits_per_entry, QB.bits_per_entry)
    return float(gap_bits(bits, D)), bits, D


def mean_gap(rate, **kw):
    """Gap of the mean distortion over SEEDS products, at the largest rate
    any of them spent."""
    runs = [measured_gap(rate, seed, **kw) for seed in range(SEEDS)]
    bits = max(r[1] for r in runs)
    D = float(np.mean([r[2] for r in runs]))
    return float(gap_bits(bits, D)), bits, D


@pytest.mark.parametrize("rate", [3.0, 4.0])
def test_variable_mode_gap(rate):
    gap, bits, D = mean_gap(rate)
    assert bits <= rate
    assert 0.0 < gap <= 0.22, (gap, bits, D)


def test_fixed_mode_gap():
    gap, bits, D = mean_gap(4.0, mode="fixed")
    assert bits <= 4.0 + 0.02
    assert 0.0 < gap <= 0.45, (gap, bits, D)


def test_mmse_beats_unbiased_in_the_product():
    A, B = gaussian((N, 32), 11), gaussian((N, 32), 12)
    D = {}
    for est in ("mmse", "unbiased"):
        QA = nqlib.quantize(A, 2.0, seed=1, estimator=est)
        QB = nqlib.quantize(B, 2.0, seed=1, estimator=est)
        D[est] = nqlib.matmul_distortion(A, B, nqlib.inner_products(QA, QB))
    # theory (theory.md section 2): 2m - m^2 against about 2m + 3m^2 for a
    # per-entry error m ~ 0.08 at 2 bits, about 14% apart (measured: 16%);
    # both decoders read the same codes
    assert D["mmse"] < 0.92 * D["unbiased"], D


# ------------------------------------------ the universal ingredients
def relative_product_error(A, B, rate, **kw):
    QA = nqlib.quantize(A, rate, seed=3, **kw)
    QB = nqlib.quantize(B, rate, seed=3, **kw)
    C = A.T @ B
    return float(np.linalg.norm(nqlib.inner_products(QA, QB) - C) ** 2
                 / np.linalg.norm(C) ** 2)


@pytest.mark.parametrize("mode", ["variable", "fixed"])
def test_centering_matters_for_a_common_offset(mode):
    """Columns 10 + N(0, 1): without centering the offset's energy (100x the
    signal's) is quantized with the rest; with it, the mean is side
    information and A^T B = Abar^T Bbar + n mu nu^T is exact in its large
    part."""
    A = gaussian((1024, 16), 1) + 10.0
    B = gaussian((1024, 16), 2) + 10.0
    with_c = relative_product_error(A, B, 4.0, mode=mode)
    without = relative_product_error(A, B, 4.0, mode=mode, center=False)
    assert without > 100 * with_c, (without, with_c)


def test_rotation_matters_for_spiky_columns():
    """Half the columns are spikes sqrt(n) e_k. Unrotated, a spike overloads
    every scale of the fixed-rate code; the rotation spreads it over all
    coordinates, where it looks Gaussian."""
    n, a = 1024, 16
    rng = np.random.default_rng(4)
    A = rng.standard_normal((n, a))
    A[:, ::2] = 0.0
    A[rng.integers(0, n, a // 2), np.arange(0, a, 2)] = np.sqrt(n)
    B = rng.standard_normal((n, a))
    rotated = relative_product_error(A, B, 4.0, mode="fixed")
    unrotated = relative_product_error(A, B, 4.0, mode="fixed", rotate=False)
    assert rotated < 0.02
    assert unrotated > 10 * rotated, (unrotated, rotated)


def test_matmul_is_a_deprecated_alias_of_inner_products():
    """``nqlib.matmul(QA, QB)`` returns ``A.T @ B``, which a numpy user
    reads as ``QA @ QB``: the name stays one release, warning, and computes
    exactly what ``inner_products`` does."""
    rng = np.random.default_rng(8)
    QA = nqlib.quantize(rng.standard_normal((512, 3)), 3.0, seed=2)
    QB = nqlib.quantize(rng.standard_normal((512, 5)), 3.0, seed=2)
    with pytest.warns(DeprecationWarning, match="inner_products"):
        C = nqlib.matmul(QA, QB)
    np.testing.assert_array_equal(C, nqlib.inner_products(QA, QB))
    assert C.shape == (3, 5)
