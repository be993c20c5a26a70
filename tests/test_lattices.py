"""Closest-point decoders of Z^n, D_n, A2, D4 and E8.

* oracle tests: every backend is as near as a brute-force search (compared in
  distance: at a tie both answers are right), on random and on tie inputs;
* cross-backend exactness: numba and numpy return the same bits;
* properties (hypothesis): membership, idempotence, equivariance under lattice
  shifts (bit for bit on dyadic inputs), symmetry under automorphisms;
* the normalized second moment by Monte Carlo, with a tolerance derived from
  the standard error;
* types, dtypes and error messages.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nqlib.lattices import A2, D4, E8, Dn, Zn, lattice
from nqlib.reference import lattices as ref

BACKENDS = ("numba", "numpy")
LATTICES = {
    **{f"Z{n}": Zn(n) for n in range(1, 9)},
    **{f"D{n}": Dn(n) for n in range(2, 9)},
    "A2": A2(),
    "E8": E8(),
}
NAMES = sorted(LATTICES)

coords = st.floats(-50, 50, allow_nan=False, allow_infinity=False, width=64)
# multiples of 1/64: sums of these and of half-integers are exact in float64,
# so the decoders see exactly the same numbers after a lattice shift
dyadic = st.integers(-3200, 3200).map(lambda k: k / 64)
# multiples of 1/4: mostly ties (halves) and cosets at equal distance
quarters = st.integers(-40, 40).map(lambda k: k / 4)


def sq_dist(x, y):
    return ((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2).sum(axis=-1)


def bruteforce(lat, x):
    """Nearest lattice point by exhaustive search (``nqlib.reference``)."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    if lat.family == "E8":
        return ref.closest_point_e8_bruteforce(x)
    if lat.family == "Dn":
        return ref.closest_point_dn_bruteforce(x)
    # Z^n: the nearest point is round(x) itself, a box of radius 1 is ample;
    # A2: its basis is reduced, radius 2 (checked below against radius 4)
    radius = 1 if lat.family == "Zn" else 2
    return ref.closest_point_bruteforce(x, lat.generator, radius=radius)


def tie_inputs(lat):
    """Hand-placed points on Voronoi boundaries of ``lat`` (float64, exact)."""
    d = lat.dim
    one = np.ones(d)
    rows = [0.5 * one, -0.5 * one, 1.5 * one, 0.5 * (-1.0) ** np.arange(d),
            np.eye(d)[0] * 0.5, np.eye(d)[-1] * -0.5, np.zeros(d)]
    if d > 1:
        rows.append(np.r_[0.5, 0.5, np.zeros(d - 2)])
        rows.append(np.r_[1.5, -0.5, np.zeros(d - 2)])
    if lat.family == "E8":
        # equidistant from 0 (in D8) and from 1/2 (in D8 + 1/2): distance^2 1/2
        rows += [0.25 * one, -0.25 * one, np.r_[0.75, 0.25 * one[1:]],
                 np.r_[0.25 * one[:7], -0.25], 0.75 * one,
                 np.r_[0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0]]
    if lat.family == "A2":
        # midpoints of lattice vectors and deep holes (three nearest points)
        g = lat.generator
        for k in [(0.5, 0), (0, 0.5), (0.5, 0.5), (1 / 3, 1 / 3), (2 / 3, 2 / 3),
                  (1.5, -0.5), (-0.5, 2.5)]:
            rows.append(g @ np.array(k))
    rng = np.random.default_rng(7)
    rows += list(rng.integers(-12, 13, size=(64, d)) / 4)
    return np.array(rows, dtype=np.float64)


def points_for(lat, elements, m=3):
    return arrays(np.float64, (m, lat.dim), elements=elements)


# ----------------------------------------------------------------- oracle tests
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_as_near_as_bruteforce_random(name, backend):
    lat = LATTICES[name]
    rng = np.random.default_rng(NAMES.index(name))
    x = rng.normal(scale=3.0, size=(200, lat.dim))
    y = lat.closest_point(x, backend=backend)
    np.testing.assert_allclose(sq_dist(x, y), sq_dist(x, bruteforce(lat, x)),
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_as_near_as_bruteforce_on_ties(name, backend):
    lat = LATTICES[name]
    x = tie_inputs(lat)
    y = lat.closest_point(x, backend=backend)
    np.testing.assert_allclose(sq_dist(x, y), sq_dist(x, bruteforce(lat, x)),
                               rtol=0, atol=1e-9)


@settings(deadline=None, max_examples=25)  # the first call pays numba's compile
@given(st.sampled_from(NAMES), st.data())
def test_as_near_as_bruteforce_hypothesis(name, data):
    lat = LATTICES[name]
    x = data.draw(points_for(lat, st.one_of(coords, quarters)))
    slow = sq_dist(x, bruteforce(lat, x))
    for backend in BACKENDS:
        fast = sq_dist(x, lat.closest_point(x, backend=backend))
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-9)


def test_e8_tie_between_cosets_goes_to_the_integer_coset():
    x = np.full(8, 0.25)   # |x|^2 = |x - 1/2|^2 = 1/2
    for backend in BACKENDS:
        np.testing.assert_array_equal(E8().closest_point(x, backend=backend),
                                      np.zeros(8))


def test_dn_tie_rule_lowest_index_towards_v():
    # (1/2, 0, 0, 0) rounds to (1, 0, 0, 0), odd; coordinate 0 has the largest
    # error and moves towards v: -1
    x = np.array([[0.5, 0.0, 0.0, 0.0], [0.0, 0.5, -0.5, 0.0]])
    want = np.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    for backend in BACKENDS:
        np.testing.assert_array_equal(D4().closest_point(x, backend=backend), want)


@pytest.mark.parametrize("name", ["A2", "Z2", "Z3"])
def test_bruteforce_radius_two_is_enough(name):
    # the assumption behind closest_point_bruteforce's default radius
    lat = LATTICES[name]
    x = np.random.default_rng(3).normal(scale=20.0, size=(300, lat.dim))
    np.testing.assert_allclose(
        sq_dist(x, ref.closest_point_bruteforce(x, lat.generator, radius=2)),
        sq_dist(x, ref.closest_point_bruteforce(x, lat.generator, radius=4)),
        rtol=0, atol=1e-12)


# ------------------------------------------------------ cross-backend exactness
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", NAMES)
def test_numba_equals_numpy_bit_for_bit(name, dtype):
    lat = LATTICES[name]
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.normal(scale=4.0, size=(500, lat.dim)),
                        tie_inputs(lat)]).astype(dtype)
    a = lat.closest_point(x, backend="numba")
    b = lat.closest_point(x, backend="numpy")
    assert a.dtype == b.dtype == dtype
    np.testing.assert_array_equal(a, b)


@settings(deadline=None, max_examples=40)
@given(st.sampled_from(NAMES), st.booleans(), st.data())
def test_numba_equals_numpy_hypothesis(name, single, data):
    lat = LATTICES[name]
    elements = st.one_of(coords, quarters, dyadic)
    x = data.draw(points_for(lat, elements, m=4))
    if single:
        x = x.astype(np.float32)
    np.testing.assert_array_equal(lat.closest_point(x, backend="numba"),
                                  lat.closest_point(x, backend="numpy"))


# ------------------------------------------------------------------- properties
def is_member(lat, y):
    y = np.asarray(y, dtype=np.float64)
    integral = np.all(y == np.floor(y), axis=-1)
    if lat.family == "Zn":
        return integral
    if lat.family == "Dn":
        return integral & (y.sum(axis=-1) % 2 == 0)
    if lat.family == "E8":
        # E8 = D8 u (D8 + 1/2): all coordinates in Z or all in Z + 1/2, and
        # an even coordinate sum (4 + even for the half-integer coset)
        halves = np.all(y - 0.5 == np.floor(y - 0.5), axis=-1)
        return (integral | halves) & (y.sum(axis=-1) % 2 == 0)
    # A2: integer coordinates in the basis G
    k = y @ lat.generator_inverse.T
    return np.all(np.abs(k - np.round(k)) < 1e-9, axis=-1)


@settings(deadline=None, max_examples=40)
@given(st.sampled_from(NAMES), st.sampled_from(BACKENDS), st.data())
def test_membership(name, backend, data):
    lat = LATTICES[name]
    x = data.draw(points_for(lat, st.one_of(coords, quarters), m=4))
    assert is_member(lat, lat.closest_point(x, backend=backend)).all()


def test_membership_rules_reject_non_members():
    assert not is_member(Dn(4), np.array([1.0, 0, 0, 0]))
    assert not is_member(E8(), np.r_[0.5 * np.ones(7), 1.5])  # odd sum
    assert not is_member(E8(), np.r_[0.5 * np.ones(7), 1.0])  # mixed
    assert not is_member(A2(), np.array([0.5, 0.0]))
    assert is_member(E8(), np.r_[0.5 * np.ones(6), -0.5, -0.5])
    assert not is_member(E8(), np.r_[0.5 * np.ones(7), -0.5])    # odd sum


@settings(deadline=None, max_examples=40)
@given(st.sampled_from(NAMES), st.sampled_from(BACKENDS), st.data())
def test_idempotent(name, backend, data):
    lat = LATTICES[name]
    x = data.draw(points_for(lat, st.one_of(coords, quarters)))
    y = lat.closest_point(x, backend=backend)
    np.testing.assert_array_equal(lat.closest_point(y, backend=backend), y)


def draw_lattice_vector(lat, data, integer_coset_only=False):
    d = lat.dim
    k = data.draw(arrays(np.int64, d, elements=st.integers(-5, 5)))
    if lat.family == "A2":
        return lat.generator @ k
    v = k.astype(np.float64)
    if lat.family in ("Dn", "E8"):
        v[0] += v.sum() % 2               # a point of D_n
    if lat.family == "E8" and not integer_coset_only and data.draw(st.booleans()):
        v = v + 0.5                       # D8 + 1/2, the other coset of E8
    return v


ZN_DN_E8 = [n for n in NAMES if n != "A2"]


@settings(deadline=None, max_examples=60)
@given(st.sampled_from(ZN_DN_E8), st.sampled_from(BACKENDS), st.data())
def test_commutes_with_lattice_shifts_bit_for_bit(name, backend, data):
    lat = LATTICES[name]
    x = data.draw(points_for(lat, st.one_of(dyadic, quarters)))
    # E8: only shifts by D8 are exact. A shift by D8 + 1/2 swaps the two
    # cosets, and the fixed tie rule (integer coset wins) then picks the other
    # of two equidistant points: see the next test.
    v = draw_lattice_vector(lat, data, integer_coset_only=True)
    np.testing.assert_array_equal(lat.closest_point(x + v, backend=backend),
                                  lat.closest_point(x, backend=backend) + v)


@settings(deadline=None, max_examples=60)
@given(st.sampled_from(NAMES), st.sampled_from(BACKENDS), st.data())
def test_commutes_with_lattice_shifts_in_distance(name, backend, data):
    lat = LATTICES[name]
    x = data.draw(points_for(lat, st.one_of(coords, quarters)))
    v = draw_lattice_vector(lat, data)
    y_shift = lat.closest_point(x + v, backend=backend)
    y = lat.closest_point(x, backend=backend)
    np.testing.assert_allclose(sq_dist(x + v, y_shift), sq_dist(x, y),
                               rtol=0, atol=1e-9)
    assert is_member(lat, y_shift - v).all()


def test_e8_half_shift_swaps_the_tie():
    # x = (1/4, ...) decodes to 0; x + 1/2 decodes to 1, not to 0 + 1/2:
    # both are at distance^2 1/2, and the integer coset wins ties
    x = np.full(8, 0.25)
    v = np.full(8, 0.5)
    for backend in BACKENDS:
        y = E8().closest_point(x + v, backend=backend)
        np.testing.assert_array_equal(y, np.ones(8))
        assert sq_dist(x + v, y) == sq_dist(x, E8().closest_point(x)) == 0.5


@settings(deadline=None, max_examples=60)
@given(st.sampled_from([f"D{n}" for n in range(2, 9)] + ["E8"]),
       st.sampled_from(BACKENDS), st.data())
def test_symmetric_under_permutations_and_even_sign_changes(name, backend, data):
    lat = LATTICES[name]
    d = lat.dim
    x = data.draw(points_for(lat, st.one_of(coords, quarters)))
    perm = data.draw(st.permutations(range(d)))
    signs = np.array(data.draw(st.lists(st.sampled_from([-1.0, 1.0]),
                                        min_size=d, max_size=d)))
    if np.prod(signs) < 0:
        signs[0] = -signs[0]               # an even number of sign changes
    px = x[:, perm] * signs
    y = lat.closest_point(x, backend=backend)
    py = lat.closest_point(px, backend=backend)
    np.testing.assert_allclose(sq_dist(px, py), sq_dist(x, y), rtol=0, atol=1e-9)
    # the image of Q(x) is a lattice point as near to px as Q(px)
    assert is_member(lat, y[:, perm] * signs).all()


# ------------------------------------------------------------ exact lattice data
def test_volumes_and_known_second_moments():
    assert Zn(5).volume == pytest.approx(1.0)
    for n in range(2, 9):
        assert Dn(n).volume == pytest.approx(2.0)
    assert E8().volume == pytest.approx(1.0)
    assert A2().volume == pytest.approx(np.sqrt(3) / 2)
    assert Zn(3).normalized_second_moment == 1 / 12
    assert Dn(2).normalized_second_moment == pytest.approx(1 / 12)  # rotated Z^2
    assert Dn(3).normalized_second_moment == pytest.approx(0.0787451, abs=1e-7)
    assert D4().normalized_second_moment == pytest.approx(0.0766032, abs=1e-7)
    assert A2().normalized_second_moment == pytest.approx(0.0801875, abs=1e-7)
    assert E8().normalized_second_moment == pytest.approx(929 / 12960, abs=1e-15)
    np.testing.assert_allclose(E8().generator @ E8().generator_inverse, np.eye(8),
                               atol=1e-15)


def test_lattice_by_name():
    assert lattice("E8") is E8()
    assert lattice("A2") is A2()
    assert lattice("D4") is D4()
    assert lattice("Z3") is Zn(3)
    for bad in ["E7", "X", "", "Dx", 8]:
        with pytest.raises(ValueError, match="lattice name"):
            lattice(bad)
    with pytest.raises(ValueError, match="n must be"):
        Dn(1)
    with pytest.raises(ValueError, match="n must be"):
        Zn(0)
    with pytest.raises(ValueError, match="n must be an integer"):
        Zn(2.5)


def fundamental_cell_error(lat, m, rng):
    """``m`` draws of U uniform on the Voronoi cell: x uniform on the
    fundamental parallelepiped G [0, 1)^d (a fundamental domain), minus Q(x)."""
    x = rng.random((m, lat.dim)) @ lat.generator.T
    return x - lat.closest_point(x, backend="numba")


@pytest.mark.parametrize("name", ["Z1", "A2", "D3", "D4", "E8"])
def test_normalized_second_moment_monte_carlo(name):
    # G = E|U|^2 / (d vol^(2/d)). Each draw contributes s = |U|^2/(d vol^(2/d)),
    # bounded, so the sample mean has standard error std(s)/sqrt(m); at m = 2e5
    # it is about 1e-4 of G's 0.07..0.08. Five standard errors: a false alarm
    # every ~2 million runs. The gaps between the lattices' G (>= 2e-3) are
    # twenty standard errors or more, so the test tells them apart.
    lat = lattice(name)
    m = 200_000
    u = fundamental_cell_error(lat, m, np.random.default_rng(2024))
    s = (u**2).sum(axis=1) / (lat.dim * lat.volume ** (2 / lat.dim))
    se = s.std() / np.sqrt(m)
    assert se < 2e-4
    assert abs(s.mean() - lat.normalized_second_moment) < 5 * se, (s.mean(), se)


def test_normalized_second_moment_e8_tight():
    # 4e6 draws: standard error ~1.5e-5, enough to resolve G(E8) from
    # G(D8) = 0.0758 and from E8's value to three significant digits
    lat = E8()
    rng = np.random.default_rng(99)
    total, total_sq, m = 0.0, 0.0, 0
    for _ in range(20):
        s = (fundamental_cell_error(lat, 200_000, rng) ** 2).sum(axis=1) / 8
        total += s.sum()
        total_sq += (s**2).sum()
        m += s.size
    mean = total / m
    se = np.sqrt((total_sq / m - mean**2) / m)
    assert abs(mean - 929 / 12960) < 5 * se, (mean, se)


# ----------------------------------------------------------- types and errors
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["E8", "D4", "A2", "Z3"])
def test_tensor_in_tensor_out(name, dtype):
    torch = pytest.importorskip("torch")
    lat = LATTICES[name]
    x = np.random.default_rng(5).normal(size=(2, 3, lat.dim)).astype(dtype)
    out = lat.closest_point(torch.from_numpy(x), backend="numba")
    assert isinstance(out, torch.Tensor)
    assert out.dtype == getattr(torch, dtype) and out.shape == x.shape
    np.testing.assert_array_equal(out.numpy(), lat.closest_point(x, backend="numpy"))


def test_shapes_and_dtypes_follow_the_input():
    x = np.random.default_rng(1).normal(size=(2, 3, 8))
    for backend in BACKENDS:
        assert E8().closest_point(x, backend=backend).shape == (2, 3, 8)
        assert E8().closest_point(x[0, 0], backend=backend).shape == (8,)
        y = E8().closest_point(x.astype(np.float32), backend=backend)
        assert y.dtype == np.float32
        y = D4().closest_point(np.arange(4), backend=backend)   # ints -> float64
        assert y.dtype == np.float64
        assert E8().closest_point(np.empty((0, 8)), backend=backend).shape == (0, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_argument(backend):
    with pytest.raises(ValueError, match="x must have last dimension 8"):
        E8().closest_point(np.zeros((3, 4)), backend=backend)
    with pytest.raises(ValueError, match="x must have last dimension"):
        A2().closest_point(np.float64(1.0), backend=backend)
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((2, 4))
        x[1, 2] = bad
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            D4().closest_point(x, backend=backend)
    with pytest.raises(ValueError, match="x must be a real numeric array"):
        Zn(2).closest_point(np.array(["a", "b"]), backend=backend)


def test_tensor_errors_name_the_argument():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="x must have last dimension 8"):
        E8().closest_point(torch.zeros(3, 4), backend="numba")
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        E8().closest_point(torch.full((1, 8), float("nan")), backend="numba")


def test_unknown_or_impossible_backend():
    with pytest.raises(RuntimeError, match="torch.Tensor"):
        E8().closest_point(np.zeros(8), backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        E8().closest_point(np.zeros(8), backend="cuda")

