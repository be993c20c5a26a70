"""nqlib.theory.bound (Gamma, R*, inverse, gap) and nqlib.theory.montecarlo."""

import math

import mpmath
import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq

from nqlib.theory import bound
from nqlib.theory import montecarlo as mc

# The table of docs/theory.md section 2, six significant digits.
TABLE_RATES = [0.25, 0.5, 0.75, "R*", 1, 2, 3, 4, 4.25, 5]
TABLE_GAMMA = [0.858853, 0.717706, 0.576559, 0.488300, 0.437500, 0.121094,
               0.0310059, 0.00779724, 0.00551664, 0.00195217]
LN2 = math.log(2.0)
rates = st.floats(0.0, 12.0, allow_nan=False, allow_infinity=False)


def _rho(R):
    return 2.0 ** (-2.0 * np.asarray(R, dtype=np.float64))


def _is_zero(expr):
    """Symbolic zero test for sums of powers of 2 (sympy's simplify alone
    does not merge 2**(2R) and 4**R)."""
    return sp.simplify(sp.expand(expr.rewrite(sp.exp))) == 0


# ---------------------------------------------------------------- closed forms

def test_gamma_matches_the_table_to_six_digits():
    for r, expected in zip(TABLE_RATES, TABLE_GAMMA):
        value = bound.gamma(bound.R_STAR if r == "R*" else r)
        assert f"{value:.6g}" == f"{expected:.6g}", (r, value, expected)


def test_r_star_closed_form_is_the_lambert_w_expression():
    half_sqrt_e = -1 / (2 * sp.sqrt(sp.E))
    target = (-2 * sp.LambertW(half_sqrt_e, -1) - 1) / (4 * sp.log(2))
    assert bound.R_STAR_EXPR.has(sp.LambertW)
    assert abs(sp.N(bound.R_STAR_EXPR - target, 60)) < sp.Float(10) ** -55


def test_r_star_is_the_nearest_double_and_agrees_with_brentq():
    with mpmath.workdps(50):
        w = mpmath.lambertw(-1 / (2 * mpmath.sqrt(mpmath.e)), -1)
        exact = (-2 * w - 1) / (4 * mpmath.log(2))
        assert abs(mpmath.mpf(bound.R_STAR) - exact) <= 0.5 * np.spacing(0.9)
    root = brentq(lambda r: np.expm1(2 * r * LN2) - 4 * r * LN2, 0.5, 2.0,
                  xtol=1e-16, rtol=4 * np.finfo(float).eps)
    assert abs(bound.R_STAR - root) < 4e-15
    # docs/theory.md quotes 0.906323536951553; the exact value is
    # 0.90632353695155078776..., so the quoted last digit is 2e-15 off.
    assert abs(bound.R_STAR - 0.906323536951553) < 3e-15
    assert f"{bound.R_STAR:.13f}" == "0.9063235369516"


def test_tangency_equation_factors_into_the_simple_form():
    R = bound.R
    residual = (bound.tangency_eq.lhs - bound.tangency_eq.rhs) * 2 ** (4 * R)
    simple = 2 ** (2 * R) - 1 - 4 * R * sp.log(2)
    assert _is_zero(residual + (2 ** (2 * R) - 1) * simple)
    with mpmath.workdps(50):
        assert abs(sp.N(simple.subs(R, bound.R_STAR_EXPR), 50)) < 1e-45


def test_phi_expression_and_numeric_agree_with_the_closed_form():
    R = bound.R
    assert _is_zero(bound.phi_expr - (1 - (1 - 2 ** (-2 * R)) ** 2))
    r = np.linspace(0, 10, 101)
    rho = _rho(r)
    np.testing.assert_allclose(bound.phi(r), 2 * rho - rho**2, rtol=1e-14)
    # the 1 - (1 - rho)^2 form loses digits to cancellation at high rate
    np.testing.assert_allclose(bound.phi(r), 1 - (1 - rho) ** 2, rtol=1e-10)
    assert bound.phi(0.0) == 1.0 and bound.phi(1.0) == 0.4375


def test_gamma_is_continuous_and_c1_at_r_star():
    R = bound.R
    linear, curved = (piece for piece, _ in bound.gamma_expr.args)
    r_star = bound.R_STAR_EXPR
    value_gap = (linear - curved).subs(R, r_star)
    slope_gap = (sp.diff(linear, R) - sp.diff(curved, R)).subs(R, r_star)
    assert abs(sp.N(value_gap, 50)) < 1e-45
    assert abs(sp.N(slope_gap, 50)) < 1e-45
    # and the generated numeric function: one-sided difference quotients
    h = 1e-6
    left = (bound.gamma(bound.R_STAR) - bound.gamma(bound.R_STAR - h)) / h
    right = (bound.gamma(bound.R_STAR + h) - bound.gamma(bound.R_STAR)) / h
    assert abs(left - bound.SLOPE) < 1e-8
    assert abs(right - bound.SLOPE) < 1e-6
    assert f"{bound.SLOPE:.7f}" == "-0.5645883"
    assert bound.SLOPE == pytest.approx((bound.GAMMA_AT_R_STAR - 1) / bound.R_STAR)


def test_g_is_convex_below_one_half_and_concave_above():
    t = sp.Symbol("t", nonnegative=True)
    g = 1 - bound.phi_expr.subs(bound.R, t)
    g2 = sp.lambdify(t, sp.diff(g, t, 2), "numpy")
    grid = np.linspace(0.0, 3.0, 301)
    assert np.all(g2(grid[grid < 0.5 - 1e-9]) > 0)
    assert np.all(g2(grid[grid > 0.5 + 1e-9]) < 0)
    assert sp.solve(sp.diff(g, t, 2), t) == [sp.Rational(1, 2)]


def test_gamma_inv_inverts_gamma_on_both_branches():
    r = np.concatenate([np.linspace(0, bound.R_STAR, 50),
                        np.linspace(bound.R_STAR, 20, 200)])
    np.testing.assert_allclose(bound.gamma_inv(bound.gamma(r)), r,
                               rtol=1e-12, atol=1e-12)
    d = np.concatenate([np.geomspace(1e-12, bound.GAMMA_AT_R_STAR, 100),
                        np.linspace(bound.GAMMA_AT_R_STAR, 1.0, 50)])
    np.testing.assert_allclose(bound.gamma(bound.gamma_inv(d)), d, rtol=1e-12)
    assert bound.gamma_inv(1.0) == 0.0
    # the curved branch has no cancellation at small D: phi(R) ~ 2 2^(-2R)
    assert bound.gamma_inv(2.0 * 2.0 ** -60) == pytest.approx(30.0, rel=1e-12)


def test_gamma_is_decreasing_convex_and_below_phi():
    r = np.linspace(0, 8, 4001)
    g = bound.gamma(r)
    assert np.all(np.diff(g) < 0)
    assert np.all(np.diff(g, 2) > -1e-12)
    assert np.all(g <= bound.phi(r) + 1e-15)
    below = (r > 0) & (r < bound.R_STAR - 1e-3)
    assert np.all(g[below] < bound.phi(r[below]))
    np.testing.assert_array_equal(g[r >= bound.R_STAR], bound.phi(r[r >= bound.R_STAR]))


def test_gap_bits_is_zero_on_the_bound():
    assert bound.gap_bits(2.0, bound.phi(1.5)) == pytest.approx(0.5, abs=1e-12)
    assert bound.gap_bits(0.5, bound.gamma(0.5)) == pytest.approx(0.0, abs=1e-12)
    out = bound.gap_bits(np.array([1.0, 2.0]), 0.4375)
    np.testing.assert_allclose(out, [0.0, 1.0], atol=1e-12)


def test_unbiased_bound():
    r = np.linspace(bound.R_STAR, 10, 200)
    rho = _rho(r)
    exact = bound.phi(r) / (1 - rho) ** 2
    np.testing.assert_allclose(bound.unbiased_bound(r), exact, rtol=1e-12)
    # its expansion in rho is 2 rho + 3 rho^2 + 4 rho^3 + ...
    x = sp.Symbol("x")
    series = sp.series((2 * x - x**2) / (1 - x) ** 2, x, 0, 4).removeO()
    assert sp.expand(series - (2 * x + 3 * x**2 + 4 * x**3)) == 0
    assert np.all(bound.unbiased_bound(r) >= 2 * rho + 3 * rho**2)
    low = np.linspace(0.01, bound.R_STAR, 50)
    g = bound.gamma(low)
    np.testing.assert_allclose(bound.unbiased_bound(low), g / (1 - g), rtol=1e-12)
    assert bound.unbiased_bound(0.0) == math.inf
    assert f"{bound.unbiased_bound(4.0):.6g}" == "0.00785852"


def test_scalars_give_floats_and_arrays_keep_their_shape():
    for f in (bound.phi, bound.gamma, bound.unbiased_bound):
        assert type(f(1.0)) is float and type(f(0)) is float
        assert f(np.ones((2, 3))).shape == (2, 3)
        assert f([0.5, 2.0]).shape == (2,)
    assert type(bound.gamma_inv(0.5)) is float
    assert bound.gamma_inv(np.full((4, 1), 0.5)).shape == (4, 1)
    assert type(bound.gap_bits(1.0, 0.5)) is float


@pytest.mark.parametrize("f", [bound.phi, bound.gamma, bound.unbiased_bound])
@pytest.mark.parametrize("bad", [-0.1, np.nan, np.inf, [1.0, -1.0]])
def test_bad_rates_raise(f, bad):
    with pytest.raises(ValueError, match="R must be"):
        f(bad)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, np.nan, np.inf, [0.5, 0.0]])
def test_bad_distortions_raise(bad):
    with pytest.raises(ValueError, match="D must lie in"):
        bound.gamma_inv(bad)
    with pytest.raises(ValueError, match="D must lie in"):
        bound.gap_bits(1.0, bad)


def test_gap_bits_bad_rate_raises():
    with pytest.raises(ValueError, match="rate must be"):
        bound.gap_bits(-1.0, 0.5)


def test_lazy_attributes():
    assert "R_STAR" in dir(bound) and "R_STAR" in bound.__all__
    with pytest.raises(AttributeError):
        bound.NOT_A_NAME  # noqa: B018


# ------------------------------------------------------- property-based tests

@settings(deadline=None, max_examples=200)
@given(rates)
def test_gamma_properties(r):
    g = bound.gamma(r)
    assert 0 < g <= 1
    assert g <= bound.phi(r) + 1e-15
    # phi(R) <= 2 2^(-2R), and the envelope is even lower
    assert g <= 2 * 2.0 ** (-2 * r) + 1e-15
    assert bound.gamma_inv(g) == pytest.approx(r, rel=1e-10, abs=1e-12)
    assert abs(bound.gap_bits(r, g)) < 1e-9 * max(1.0, r)
    assert bound.unbiased_bound(r) > g


@settings(deadline=None, max_examples=200)
@given(rates, rates)
def test_gamma_is_convex(x, y):
    mid = bound.gamma((x + y) / 2)
    assert mid <= (bound.gamma(x) + bound.gamma(y)) / 2 + 1e-14


@settings(deadline=None, max_examples=100)
@given(st.floats(1e-300, 1.0, allow_nan=False))
def test_gamma_inv_properties(d):
    r = bound.gamma_inv(d)
    assert r >= 0
    assert bound.gamma(r) == pytest.approx(d, rel=1e-10)


# ------------------------------------------------------------- Monte Carlo

def test_gaussian_matrices_are_seeded():
    A1, B1 = mc.gaussian_matrices(8, 3, 2, seed=5)
    A2, B2 = mc.gaussian_matrices(8, 3, 2, seed=5)
    assert A1.shape == (8, 3) and B1.shape == (8, 2)
    np.testing.assert_array_equal(A1, A2)
    np.testing.assert_array_equal(B1, B2)
    with pytest.raises(ValueError, match="n must be"):
        mc.gaussian_matrices(0, 3, 2, seed=5)


@pytest.mark.parametrize("rate", [0.3, 1.0, 2.5])
def test_test_channel_is_the_mmse_channel(rate):
    # N iid entries: each statistic below is a mean of iid terms, so its
    # standard error is known in closed form; allow 5 of them.
    N = 400_000
    rng = np.random.default_rng(11)
    x = rng.standard_normal((N, 1))
    xh = mc.test_channel(x, rate, rng)
    rho = 2.0 ** (-2 * rate)
    err = x - xh
    # (x - xh)^2 = rho chi^2_1: variance 2 rho^2
    assert abs(np.mean(err**2) - rho) < 5 * rho * math.sqrt(2 / N)
    # xh^2 = (1 - rho) chi^2_1
    assert abs(np.mean(xh**2) - (1 - rho)) < 5 * (1 - rho) * math.sqrt(2 / N)
    # orthogonality E[(x - xh) xh] = 0: the term has variance rho (1 - rho)
    assert abs(np.mean(err * xh)) < 5 * math.sqrt(rho * (1 - rho) / N)


def test_unbiased_channel_is_unbiased_with_the_predicted_mse():
    N, rate = 400_000, 1.0
    rng = np.random.default_rng(12)
    x = rng.standard_normal((N, 1))
    xh = mc.unbiased_channel(x, rate, rng)
    rho = 2.0 ** (-2 * rate)
    s2 = rho / (1 - rho)
    err = xh - x
    assert abs(np.mean(err**2) - s2) < 5 * s2 * math.sqrt(2 / N)
    # E[err x] = 0 (err independent of x): the term has variance s2
    assert abs(np.mean(err * x)) < 5 * math.sqrt(s2 / N)
    # rate: 1/2 log2(1 + 1/s2) = R
    assert 0.5 * math.log2(1 + 1 / s2) == pytest.approx(rate)


def test_channel_edge_cases_and_errors():
    A = np.ones((4, 2))
    np.testing.assert_array_equal(mc.test_channel(A, 0.0, 0), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="rate must be"):
        mc.unbiased_channel(A, 0.0, 0)
    with pytest.raises(ValueError, match="rate must be"):
        mc.test_channel(A, -1.0, 0)
    with pytest.raises(ValueError, match="A must be 2-D"):
        mc.test_channel(np.ones(3), 1.0, 0)
    with pytest.raises(ValueError, match="A contains NaN"):
        mc.test_channel(np.full((2, 2), np.nan), 1.0, 0)
    with pytest.raises(ValueError, match="rng must be"):
        mc.test_channel(A, 1.0, "seed")


def test_matmul_distortion_and_its_errors():
    A, B = mc.gaussian_matrices(16, 3, 4, seed=1)
    assert mc.matmul_distortion(A, B, A.T @ B) == 0.0
    expected = np.sum((A.T @ B) ** 2) / (16 * 3 * 4)
    assert mc.matmul_distortion(A, B, np.zeros((3, 4))) == pytest.approx(expected)
    with pytest.raises(ValueError, match="C_hat must have shape"):
        mc.matmul_distortion(A, B, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="same number of rows"):
        mc.matmul_distortion(A, B[:5], np.zeros((3, 4)))
    with pytest.raises(ValueError, match="B contains NaN"):
        mc.matmul_distortion(A, B * np.nan, np.zeros((3, 4)))


def test_sketch_plan():
    m, kept_rate = mc.sketch_plan(1000, bound.R_STAR / 2)
    assert m == 500 and kept_rate == pytest.approx(bound.R_STAR)
    assert mc.sketch_plan(100, 3.0) == (100, 3.0)
    assert mc.sketch_plan(100, 0.0) == (0, 0.0)
    assert mc.sketch_plan(100, 1e-6)[0] == 1
    m, kept_rate = mc.sketch_plan(64, 0.5, point_rate=2.0)
    assert m * kept_rate == pytest.approx(64 * 0.5) and m == 16


def test_sketch_keeps_the_product_of_shared_rotated_coordinates():
    A, B = mc.gaussian_matrices(64, 3, 2, seed=3)
    # at 40 bits per kept coordinate the channel is exact to ~1e-12, so the
    # estimate is the product of the kept rotated coordinates
    rate, point_rate = 10.0, 40.0
    A_hat = mc.sketch(A, rate, 1, rotation_seed=9, point_rate=point_rate)
    B_hat = mc.sketch(B, rate, 2, rotation_seed=9, point_rate=point_rate)
    m, _ = mc.sketch_plan(64, rate, point_rate)
    assert m == 16
    # the kept rows: an orthonormal m-frame, QR of an n x m Gaussian matrix
    q, r = np.linalg.qr(np.random.default_rng(9).standard_normal((64, m)))
    u = (q * np.sign(np.diag(r))).T
    np.testing.assert_allclose(u @ u.T, np.eye(m), atol=1e-12)
    np.testing.assert_allclose(A_hat.T @ B_hat, (u @ A).T @ (u @ B), atol=1e-9)
    assert np.linalg.matrix_rank(A_hat.T @ A_hat) == 3
    other = mc.sketch(B, rate, 2, rotation_seed=10, point_rate=point_rate)
    assert not np.allclose(A_hat.T @ other, A_hat.T @ B_hat)
    np.testing.assert_array_equal(mc.sketch(A, 0.0, 1, rotation_seed=9), 0 * A)
    with pytest.raises(ValueError, match="rotation_seed must be"):
        mc.sketch(A, 0.5, 1, rotation_seed=-1)


def _within(scheme, rate, expected, *, n=256, a=32, b=32, reps=24, seed=2024):
    """Monte Carlo mean within 4.5 standard errors of ``expected``."""
    mean, se = mc.estimate_distortion(scheme, n, a, b, rate, reps=reps, seed=seed)
    assert abs(mean - expected) < 4.5 * se, (scheme, rate, mean, se, expected)
    return mean, se


def test_zero_estimate_has_distortion_one():
    _within("zero", 1.0, 1.0)


@pytest.mark.parametrize("rate", [0.5, 1.0, 2.0])
def test_shrinkage_reaches_phi(rate):
    _within("shrinkage", rate, bound.phi(rate))


@pytest.mark.parametrize("rate", [1.0, 2.0])
def test_unbiased_channel_reaches_the_unbiased_bound(rate):
    mean, _ = _within("unbiased", rate, bound.unbiased_bound(rate))
    assert mean > bound.phi(rate)


@pytest.mark.parametrize("rate", [0.25, 0.5])
def test_sketch_reaches_gamma_below_r_star(rate):
    n = 256
    m, kept_rate = mc.sketch_plan(n, rate)
    finite_n = m / n * bound.phi(kept_rate) + 1 - m / n
    assert 0 <= finite_n - bound.gamma(rate) < 2e-4  # chord just above tangent
    _within("sketch", rate, finite_n, n=n)
    # paired with the shrinkage channel on the same matrices, sketching is
    # better, by about phi(R) - Gamma(R)
    kw = dict(reps=24, seed=2024)
    diff = (mc.distortion_samples("shrinkage", n, 32, 32, rate, **kw)
            - mc.distortion_samples("sketch", n, 32, 32, rate, **kw))
    se = diff.std(ddof=1) / math.sqrt(len(diff))
    gain = bound.phi(rate) - finite_n
    assert diff.mean() > 3 * se
    assert abs(diff.mean() - gain) < 4.5 * se


def test_estimate_distortion_errors():
    with pytest.raises(ValueError, match="scheme must be"):
        mc.estimate_distortion("bogus", 8, 2, 2, 1.0, reps=2, seed=0)
    with pytest.raises(ValueError, match="reps must be"):
        mc.estimate_distortion("zero", 8, 2, 2, 1.0, reps=1, seed=0)
    with pytest.raises(ValueError, match="rate must be"):
        mc.estimate_distortion("unbiased", 8, 2, 2, 0.0, reps=2, seed=0)
