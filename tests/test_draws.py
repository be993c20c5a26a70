"""nqlib's own pseudo-random draws (format version 3): nqlib.quantizers.draws.

* the generator is SplitMix64: equal to a plain-Python transcription of the
  published algorithm (and its well-known first output from state 0);
* ``log`` / ``exp_nonpositive`` (IEEE operations only) agree with libm to
  about one ulp over the whole range they are used on;
* Gaussians have the right moments; the Haar factor is orthogonal and equals
  the LAPACK QR (signs corrected) of the same Gaussian matrix -- the oracle;
* the fixed-order kernels equal the obvious loops bit for bit;
* the version-3 dither is exact (dyadic) and lies in the Voronoi cell;
* ``RandomHadamard(version=...)`` keeps the version-2 draw for old files.
"""

import math

import numpy as np
import pytest

import nqlib
from nqlib import RandomHadamard
from nqlib.quantizers import coded_domain, draws

MASK = (1 << 64) - 1


def splitmix64_reference(state: int, count: int) -> list:
    """SplitMix64 as published (Steele, Lea & Flood 2014), in plain Python."""
    out = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        out.append(z ^ (z >> 31))
    return out


@pytest.mark.parametrize("key", [0, 1, 12345, MASK, draws.stream_key(7, 40, 3)])
def test_words_are_splitmix64(key):
    assert draws.words(key, 50).tolist() == splitmix64_reference(key, 50)
    assert draws.words(key, 10, start=40).tolist() == splitmix64_reference(key, 50)[40:]


def test_first_splitmix64_output_from_zero():
    assert int(draws.words(0, 1)[0]) == 0xE220A8397B1DCDAF


def test_stream_keys_separate_purposes_and_check_their_parts():
    keys = {draws.stream_key(s, n, p) for s in range(4) for n in (8, 16)
            for p in (draws.ROTATION_SIGNS, draws.ROTATION_ODD, draws.DITHER)}
    assert len(keys) == 24
    assert draws.stream_key(1, 2) != draws.stream_key(2, 1)
    with pytest.raises(ValueError, match="2\\^64"):
        draws.stream_key(2**64)


def test_uniforms_and_signs():
    u = draws.uniforms(99, 100000)
    assert u.min() >= 0.0 and u.max() < 1.0
    np.testing.assert_array_equal(u * 2.0**53, np.floor(u * 2.0**53))
    assert abs(u.mean() - 0.5) < 0.005
    s = draws.signs(99, 100000)
    assert set(np.unique(s)) == {-1.0, 1.0} and abs(s.mean()) < 0.02


def test_log_matches_libm():
    x = np.concatenate([np.geomspace(5e-324, 1.0, 200001),
                        draws.uniforms(3, 100000) + 2.0**-53,
                        [0.5, 1.0, 2.0, 1e300, np.nextafter(1.0, 0.0)]])
    ref = np.log(x)
    got = draws.log(x)
    assert np.all(np.abs(got - ref) <= 4e-16 * np.maximum(np.abs(ref), 1e-300)
                  + 2e-16)
    assert draws.log(np.array([1.0]))[0] == 0.0


def test_exp_matches_libm():
    x = -np.concatenate([np.linspace(0, 745, 200001), draws.uniforms(4, 10000)])
    ref = np.exp(x)
    got = draws.exp_nonpositive(x)
    big = ref > 1e-300
    assert np.all(np.abs(got[big] - ref[big]) <= 1e-15 * ref[big])
    assert np.all(got[x < -700] == 0.0) and draws.exp_nonpositive(0.0) == 1.0
    with pytest.raises(ValueError):
        draws.exp_nonpositive(np.array([0.5]))
    with pytest.raises(ValueError):
        draws.exp_nonpositive(np.array([np.nan]))


def test_gaussian_moments():
    g = draws.gaussians(draws.stream_key(5), 400000)
    se = 1 / math.sqrt(g.size)
    assert abs(g.mean()) < 5 * se
    assert abs(g.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(np.mean(g**4) - 3) < 5 * math.sqrt(96) * se
    # a prefix does not depend on how many were asked for
    np.testing.assert_array_equal(draws.gaussians(draws.stream_key(5), 1001),
                                  g[:1001])


@pytest.mark.parametrize("m", [3, 5, 27, 125])
def test_haar_factor_is_the_qr_oracle(m):
    key = draws.stream_key(11, m)
    O = draws.haar_orthogonal(key, m)
    np.testing.assert_allclose(O.T @ O, np.eye(m), atol=1e-14 * m)
    Z = draws.gaussians(key, m * m).reshape(m, m)
    Q, R = np.linalg.qr(Z)
    np.testing.assert_allclose(O, Q * np.sign(np.diag(R)), atol=1e-12)
    np.testing.assert_array_equal(draws.haar_orthogonal(key, m), O)


def test_haar_factor_entries_have_variance_one_over_m():
    m = 9
    x = np.concatenate([draws.haar_orthogonal(draws.stream_key(s, m), m).ravel()
                        for s in range(300)])
    assert abs(x.mean()) < 5 * math.sqrt(1 / m / x.size)
    assert abs(x.var() * m - 1) < 0.05


def test_fixed_order_kernels_are_the_obvious_loops():
    from nqlib.kernels.cpu.linalg import rows_dot, rows_times_matrix

    rng = np.random.default_rng(0)
    X, M = rng.standard_normal((7, 5)), rng.standard_normal((5, 3))
    u = rng.standard_normal(5)
    dots = np.empty(7)
    rows_dot(X, u, dots)
    for i in range(7):
        acc = 0.0
        for k in range(5):
            acc += X[i, k] * u[k]
        assert dots[i] == acc
    # the general loops (5 x 3) and the written-out 3 x 3 case (the
    # rotation's odd factor), with signed zeros among the entries
    X3 = rng.standard_normal((9, 3))
    X3[0] = -0.0
    for A, B in ((X, M), (X3, rng.standard_normal((3, 3)))):
        out = np.empty((A.shape[0], 3))
        rows_times_matrix(A, B, out)
        for i in range(A.shape[0]):
            for j in range(3):
                acc = 0.0
                for k in range(A.shape[1]):
                    acc += A[i, k] * B[k, j]
                assert out[i, j] == acc and (np.signbit(out[i, j])
                                             == np.signbit(acc))


def test_dither_is_exact_and_in_the_voronoi_cell():
    z = coded_domain.dither(5, 64, 3, 24, key=123)
    assert z.shape == (24, 8)
    np.testing.assert_array_equal(z * 2.0**41, np.floor(z * 2.0**41))
    np.testing.assert_array_equal(nqlib.E8().closest_point(z), 0.0)
    # a prefix is the same dither; the key and version change it
    np.testing.assert_array_equal(coded_domain.dither(5, 64, 3, 10, key=123), z[:10])
    assert not np.any(coded_domain.dither(5, 64, 3, 24, key=124) == z)
    assert not np.any(coded_domain.dither(5, 64, 3, 24, key=123, version=2) == z)


def test_rotation_versions():
    P3, P2 = RandomHadamard(40, seed=7), RandomHadamard(40, seed=7, version=2)
    assert P3.version == 3 and repr(P2).endswith("version=2)")
    for P in (P3, P2):
        np.testing.assert_allclose(P.matrix() @ P.matrix().T, np.eye(40), atol=1e-13)
        x = np.random.default_rng(1).standard_normal((3, 40))
        np.testing.assert_allclose(P.apply(x), x @ P.matrix().T, atol=1e-12)
        np.testing.assert_allclose(P.inverse(P.apply(x)), x, atol=1e-12)
    assert not np.array_equal(P3.signs, P2.signs)
    with pytest.raises(ValueError, match="version"):
        RandomHadamard(8, version=1)
