"""The seeded randomised Hadamard rotation: nqlib.RandomHadamard.

* the fast transform equals the dense reference matrix, which is orthogonal,
  for powers of two, odd lengths and mixed lengths ``2^k m``;
* apply / inverse round trip and norm preservation (property test);
* the numba and numpy backends agree to 1e-12;
* the seed alone determines the rotation;
* bad arguments raise ValueError (RuntimeError for an impossible backend).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nqlib import RandomHadamard

LENGTHS = [1, 8, 12, 40, 384, 1024]


@pytest.mark.parametrize("n", LENGTHS)
def test_dense_matrix_is_orthogonal(n):
    P = RandomHadamard(n, seed=3).matrix()
    assert P.shape == (n, n)
    np.testing.assert_allclose(P @ P.T, np.eye(n), rtol=0, atol=1e-12)
    np.testing.assert_allclose(P.T @ P, np.eye(n), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", LENGTHS)
def test_fast_transform_equals_dense_matrix(n):
    P = RandomHadamard(n, seed=5)
    M = P.matrix()
    x = np.random.default_rng(n).standard_normal((7, n))
    np.testing.assert_allclose(P.apply(x), x @ M.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(P.inverse(x), x @ M, rtol=0, atol=1e-12)
    # the transform of the identity's rows is the matrix itself (columns P e_j)
    np.testing.assert_allclose(P.apply(np.eye(n)).T, M, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip(n):
    P = RandomHadamard(n, seed=11)
    x = np.random.default_rng(1).standard_normal((5, n))
    np.testing.assert_allclose(P.inverse(P.apply(x)), x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(P.apply(P.inverse(x)), x, rtol=0, atol=1e-12)


def test_shapes_are_kept_and_input_not_modified():
    P = RandomHadamard(24, seed=0)
    x = np.random.default_rng(2).standard_normal((2, 3, 24))
    keep = x.copy()
    y = P.apply(x)
    assert y.shape == x.shape and y.dtype == np.float64
    np.testing.assert_array_equal(x, keep)
    v = P.apply(x[0, 0])  # a single vector
    assert v.shape == (24,)
    np.testing.assert_allclose(v, y[0, 0], rtol=0, atol=1e-14)
    # float32 and integer input are accepted and computed in float64
    np.testing.assert_allclose(P.apply(x.astype(np.float32)),
                               P.apply(x.astype(np.float32).astype(np.float64)),
                               rtol=0, atol=1e-14)
    ints = np.arange(24)
    np.testing.assert_allclose(P.apply(ints), P.apply(ints.astype(float)),
                               rtol=0, atol=0)


@settings(deadline=None, max_examples=60)  # first call pays numba's compile time
@given(st.sampled_from([1, 2, 3, 8, 12, 40, 96]).flatmap(
    lambda n: st.tuples(
        st.just(n), st.integers(0, 2**32),
        arrays(np.float64, (3, n),
               elements=st.floats(-1e3, 1e3, allow_nan=False, width=64)))))
def test_norms_and_inner_products_preserved(args):
    n, seed, x = args
    P = RandomHadamard(n, seed=seed)
    y = P.apply(x)
    scale = max(1.0, float(np.abs(x).max()))
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1),
                               rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(y @ y.T, x @ x.T, rtol=1e-10,
                               atol=1e-10 * scale * scale * n)


@pytest.mark.parametrize("n", LENGTHS)
def test_numba_equals_numpy(n):
    P = RandomHadamard(n, seed=9)
    x = np.random.default_rng(3).standard_normal((4, n))
    for op in (P.apply, P.inverse):
        np.testing.assert_allclose(op(x, backend="numba"), op(x, backend="numpy"),
                                   rtol=0, atol=1e-12)


def test_seed_determines_the_rotation():
    x = np.random.default_rng(4).standard_normal((3, 40))
    a = RandomHadamard(40, seed=123)
    b = RandomHadamard(40, seed=123)
    np.testing.assert_array_equal(a.apply(x), b.apply(x))
    np.testing.assert_array_equal(a.matrix(), b.matrix())
    c = RandomHadamard(40, seed=124)
    assert np.abs(a.matrix() - c.matrix()).max() > 0.1
    # powers of two differ in the signs only, and they do differ
    s = RandomHadamard(64, seed=1).signs
    t = RandomHadamard(64, seed=2).signs
    assert np.any(s != t)


def test_repr_names_the_factorisation():
    text = repr(RandomHadamard(384, seed=2))
    assert text == "RandomHadamard(n=384 = 128 x 3, seed=2)"


@pytest.mark.parametrize("n", [0, -4, 2.5, True, "8"])
def test_bad_length(n):
    with pytest.raises(ValueError, match="n must"):
        RandomHadamard(n, seed=0)


@pytest.mark.parametrize("seed", [-1, 1.5, None])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed must"):
        RandomHadamard(8, seed=seed)


def test_bad_input():
    P = RandomHadamard(8, seed=0)
    with pytest.raises(ValueError, match="last dimension 8"):
        P.apply(np.zeros((2, 7)))
    with pytest.raises(ValueError, match="last dimension 8"):
        P.inverse(np.float64(1.0))
    bad = np.zeros((2, 8))
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        P.apply(bad)
    bad[1, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        P.inverse(bad)
    with pytest.raises(ValueError, match="real numeric"):
        P.apply(np.array(["a"] * 8))
    with pytest.raises(ValueError, match="backend must be"):
        P.apply(np.zeros(8), backend="fortran")
    with pytest.raises(RuntimeError, match="triton"):
        P.apply(np.zeros(8), backend="triton")


def _fwht_stage_by_stage(x, scale):
    """The butterflies ``a, b = a + b, a - b`` of every span in increasing
    order over whole rows (numpy), then the scale: the order of operations
    the fast kernel keeps."""
    x = x.copy()
    r, n = x.shape
    h = 1
    while h < n:
        v = x.reshape(r, n // (2 * h), 2, h)
        a, b = v[:, :, 0].copy(), v[:, :, 1].copy()
        v[:, :, 0], v[:, :, 1] = a + b, a - b
        h *= 2
    return x * scale


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 4096])
def test_vector_butterflies_keep_the_bits(n, dtype):
    """The numba transform (its long spans on SIMD vectors) gives exactly the
    bits of the stage-by-stage butterflies, float64 and float32 rows; for
    float32 through the fused kernel's rotation helper."""
    from nqlib.kernels.cpu.hadamard import fwht_rows

    x = np.random.default_rng(n).standard_normal((3, n)).astype(dtype)
    scale = 1.0 / np.sqrt(n)
    want = _fwht_stage_by_stage(x, dtype(scale))
    if dtype == np.float64:
        got = x.copy()
        fwht_rows(got, scale)
        np.testing.assert_array_equal(got, want)
    elif n >= 8:
        from numba import njit

        from nqlib.kernels.cpu import fused

        @njit
        def run(y, p):
            for i in range(y.shape[0]):
                fused._hadamard_run(y[i], 0, p)

        got = x.copy()
        run(got, n)
        np.testing.assert_array_equal(got * dtype(scale), want)
