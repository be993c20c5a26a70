"""Nested-lattice (Voronoi) codes: nqlib.VoronoiCode.

* decode(encode(x)) is the fine-lattice quantizer beta (Q(x/beta + z) - z)
  exactly where the encoder reports no overload, and off by a non-zero coarse
  vector where it does;
* small codebooks enumerated in full: q**d distinct points, all in q V(L), each
  re-encoded to its own code;
* numba and numpy agree bit for bit (codes, overload flags, decoded values);
* with uniform subtractive dither the error per entry is beta^2 G(L)
  vol^(2/d), whatever the input, within a tolerance from the standard error;
* dtypes, tensors and error messages.
"""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nqlib import VoronoiCode
from nqlib.lattices import A2, D4, E8, Dn, Zn
from nqlib.quantizers.voronoi import code_dtype
from nqlib.reference import lattices as ref

BACKENDS = ("numba", "numpy")
LATTICES = {"Z1": Zn(1), "Z3": Zn(3), "D3": Dn(3), "D4": D4(), "D5": Dn(5),
            "A2": A2(), "E8": E8()}
NAMES = sorted(LATTICES)


def sq_dist(x, y):
    return ((x - y) ** 2).sum(axis=-1)


def uniform_on_cell(lat, m, rng):
    """``m`` points uniform on the Voronoi cell V(L): a uniform point of the
    fundamental parallelepiped G [0, 1)^d minus its nearest lattice point."""
    u = rng.random((m, lat.dim)) @ lat.generator.T
    return u - lat.closest_point(u, backend="numpy")


def fine_quantizer(lat, x, beta, z):
    """beta (Q(x / beta + z) - z), in float64 as the encoder computes it."""
    v = np.asarray(x, dtype=np.float64) / beta + z
    return beta * (lat.closest_point(v, backend="numpy") - z)


def is_member(lat, y, atol=0.0):
    k = y @ lat.generator_inverse.T
    return np.all(np.abs(k - np.round(k)) <= atol, axis=-1)


def minimal_vectors(lat):
    """The shortest non-zero lattice vectors, by brute-force enumeration. For
    the root lattices Z^n, A2, D4 and E8 they are exactly the Voronoi-relevant
    vectors: V(L) = {x : <x, r> <= |r|^2 / 2 for every minimal r} (Conway &
    Sloane, SPLAG ch. 21)."""
    d = lat.dim
    if lat.family == "A2":   # basis coordinates in {-2..2}^2
        k = np.array(list(itertools.product(range(-2, 3), repeat=d)), dtype=float)
        pts = k @ lat.generator.T
    else:                    # Z^n, D_n, E8: every point of {0, +-1/2, +-1}^d
        grid = (-1.0, -0.5, 0.0, 0.5, 1.0)
        pts = np.array(list(itertools.product(grid, repeat=d)))
        pts = pts[is_member(lat, pts, atol=1e-9)]
    norms = (pts**2).sum(axis=1)
    shortest = norms[norms > 0.5].min()
    return pts[np.abs(norms - shortest) < 1e-9]


ROOT_COUNTS = {"Z3": 6, "A2": 6, "D4": 24, "E8": 240}


# --------------------------------------------- decode(encode(x)) = fine point
@settings(deadline=None, max_examples=80)
@given(st.sampled_from(NAMES), st.integers(2, 16), st.floats(0.2, 5.0),
       st.sampled_from(["none", "shared", "rows"]), st.sampled_from(BACKENDS),
       st.data())
def test_decode_encode_is_the_fine_quantizer(name, q, beta, dither, backend, data):
    lat = LATTICES[name]
    d = lat.dim
    x = data.draw(arrays(np.float64, (6, d), elements=st.floats(
        -20, 20, allow_nan=False, allow_infinity=False)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    z = {"none": None, "shared": uniform_on_cell(lat, 1, rng)[0],
         "rows": uniform_on_cell(lat, 6, rng)}[dither]
    code = VoronoiCode(lat, q, beta)
    codes, overload = code.encode(x, z, backend=backend)
    assert codes.dtype == np.uint8 and overload.shape == (6,)
    assert codes.min() >= 0 and codes.max() < q
    x_hat = code.decode(codes, z, backend=backend)
    want = fine_quantizer(lat, x, beta, np.zeros(d) if z is None else z)
    ok = ~overload
    if lat.family == "A2":  # sqrt(3) in the basis: equal up to rounding
        np.testing.assert_allclose(x_hat[ok], want[ok], rtol=1e-12, atol=1e-12)
    else:                   # integer / half-integer points: exact
        np.testing.assert_array_equal(x_hat[ok], want[ok])
    # where overloaded, the decoder is off by a non-zero coarse vector q beta u
    off = (x_hat[overload] - want[overload]) / (q * beta)
    assert np.all(sq_dist(off, 0.0) > 0.5)
    assert is_member(lat, off, atol=1e-6).all()


@pytest.mark.parametrize("name", NAMES)
def test_no_overload_near_the_origin(name):
    # points well inside the coarse cell never overload
    lat = LATTICES[name]
    code = VoronoiCode(lat, q=8, beta=1.0)
    x = np.random.default_rng(0).uniform(-1, 1, size=(500, lat.dim))
    codes, overload = code.encode(x)
    assert not overload.any()
    np.testing.assert_allclose(code.decode(codes), lat.closest_point(x),
                               rtol=0, atol=1e-12)


# ---------------------------------------------------------------- codes, dtypes
def test_code_dtypes():
    assert code_dtype(2) == np.uint8 and code_dtype(256) == np.uint8
    assert code_dtype(257) == np.uint16 and code_dtype(65536) == np.uint16
    assert code_dtype(65537) == np.uint32
    x = np.random.default_rng(1).normal(scale=50.0, size=(200, 8))
    for q, dt in [(14, np.uint8), (256, np.uint8), (257, np.uint16),
                  (1000, np.uint16)]:
        code = VoronoiCode(E8(), q, 0.1)
        for backend in BACKENDS:
            codes, overload = code.encode(x, backend=backend)
            assert codes.dtype == dt and overload.dtype == np.bool_
            assert codes.min() >= 0 and int(codes.max()) < q
            if q > 256:   # values above 255 survive: uint8 would wrap them
                assert int(codes.max()) > 255
        np.testing.assert_array_equal(code.encode(x, backend="numba")[0],
                                      code.encode(x, backend="numpy")[0])


def test_rate_and_size():
    code = VoronoiCode(E8(), 14, 0.3)
    assert code.bits_per_entry == pytest.approx(np.log2(14))
    assert code.size == 14**8 and code.dim == 8
    assert "q=14" in repr(code)


@pytest.mark.parametrize("name", ["E8", "D4", "A2"])
def test_overload_decreases_with_q(name):
    # t = Q(x / beta) does not depend on q, and overload means t lies outside
    # q V(L); the cells q V are nested (V is convex and contains 0), so an
    # overload at q' > q implies one at q: pointwise, not only in rate.
    lat = LATTICES[name]
    x = np.random.default_rng(2).standard_normal((20_000, lat.dim))
    qs = [2, 3, 4, 5, 7, 10, 14, 20]
    flags = [VoronoiCode(lat, q, 0.5).encode(x)[1] for q in qs]
    rates = [f.mean() for f in flags]
    assert rates[0] > 0.5 and rates[-1] < 1e-3, rates
    for small, big in zip(flags, flags[1:]):
        assert not np.any(big & ~small)
    assert all(a > b for a, b in zip(rates, rates[1:]) if a > 0.01), rates


# ---------------------------------------------------- whole-codebook enumeration
SMALL_CODES = ([("E8", 2), ("E8", 3)] + [("D4", q) for q in range(2, 6)]
               + [("A2", q) for q in range(2, 9)] + [("Z3", q) for q in (2, 3, 5)])


@pytest.mark.parametrize("name,q", SMALL_CODES)
def test_whole_codebook(name, q):
    lat = LATTICES[name]
    d = lat.dim
    code = VoronoiCode(lat, q)
    points = code.codebook()
    grid = np.indices((q,) * d).reshape(d, -1).T
    assert points.shape == (q**d, d)
    # q**d distinct lattice points (distinct integer coordinates)
    k = points @ lat.generator_inverse.T
    assert np.abs(k - np.round(k)).max() < 1e-9
    assert len(np.unique(np.round(k).astype(np.int64), axis=0)) == q**d
    # each in q V(L): no coarse neighbour q r is nearer than 0
    roots = minimal_vectors(lat)
    assert len(roots) == ROOT_COUNTS[name]
    norm2 = sq_dist(points, 0.0)
    for r in roots:
        assert np.all(norm2 <= sq_dist(points, q * r) + 1e-9)
    # ... and in particular not the coarse point the decoder picks, nor the
    # one found by a brute-force search (on a subsample for the big E8 code)
    u = lat.closest_point(points / q)
    assert np.all(norm2 <= sq_dist(points, q * u) + 1e-9)
    sub = points[np.random.default_rng(q).permutation(len(points))[:1024]]
    if lat.family == "E8":
        u_bf = ref.closest_point_e8_bruteforce(sub / q)
    elif lat.family == "Dn":
        u_bf = ref.closest_point_dn_bruteforce(sub / q)
    else:
        u_bf = ref.closest_point_bruteforce(sub / q, lat.generator)
    assert np.all(sq_dist(sub, 0.0) <= sq_dist(sub, q * u_bf) + 1e-9)
    # each point re-encodes to its own code, without overload
    for backend in BACKENDS:
        codes, overload = code.encode(points, backend=backend)
        assert not overload.any()
        np.testing.assert_array_equal(codes, grid)
        np.testing.assert_array_equal(code.decode(grid, backend=backend), points)


# ------------------------------------------------------- cross-backend exactness
def backend_inputs(lat, q, beta, dtype, dither, rng):
    m = 600
    d = lat.dim
    # Gaussian rows at a scale with some overload, plus multiples of beta/4:
    # x / beta lands on halves, i.e. on Voronoi boundaries (ties)
    x = np.concatenate([rng.normal(scale=0.4 * q * beta, size=(m - 200, d)),
                        beta * rng.integers(-4 * q, 4 * q, size=(200, d)) / 4])
    x = x.astype(dtype)
    z = {"none": None,
         "shared": uniform_on_cell(lat, 1, rng)[0],
         # dyadic per-row dither keeps some ties after the shift
         "rows": rng.integers(-4, 5, size=(m, d)) / 16}[dither]
    return x, z


@pytest.mark.parametrize("dither", ["none", "shared", "rows"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("q", [2, 3, 5, 7, 14, 16])
@pytest.mark.parametrize("name", ["Z3", "D4", "D5", "A2", "E8"])
def test_numba_equals_numpy_bit_for_bit(name, q, dtype, dither):
    lat = LATTICES[name]
    beta = 0.5
    rng = np.random.default_rng(q * 1000 + len(name))
    x, z = backend_inputs(lat, q, beta, dtype, dither, rng)
    code = VoronoiCode(lat, q, beta)
    c_fast, o_fast = code.encode(x, z, backend="numba")
    c_slow, o_slow = code.encode(x, z, backend="numpy")
    np.testing.assert_array_equal(c_fast, c_slow)
    np.testing.assert_array_equal(o_fast, o_slow)
    assert 0 < o_fast.sum() < len(o_fast) or q == 2
    for out_dtype in (np.float64, np.float32):
        np.testing.assert_array_equal(
            code.decode(c_fast, z, dtype=out_dtype, backend="numba"),
            code.decode(c_fast, z, dtype=out_dtype, backend="numpy"))


# ----------------------------------------------------- dither: error statistics
@pytest.mark.parametrize("input_kind", ["gaussian", "constant"])
@pytest.mark.parametrize("name", ["Z1", "A2", "D4", "E8"])
def test_dithered_mse_per_entry(name, input_kind):
    # With z uniform on V(L), the error beta (Q(x/beta + z) - z) - x is
    # uniform on beta V(L) whatever x is (subtractive dither), so its mean
    # square per entry is beta^2 G(L) vol^(2/d). Per-row values are bounded;
    # the sample mean's standard error is std / sqrt(m), ~0.5% of the target
    # at m = 4e4. Tolerance: five standard errors.
    lat = LATTICES[name]
    d = lat.dim
    beta, q, m = 0.3, 64, 40_000
    rng = np.random.default_rng(17)
    if input_kind == "gaussian":
        x = rng.standard_normal((m, d))
    else:  # one fixed vector, m times: the error still has the same law
        x = np.tile(rng.standard_normal(d), (m, 1))
    z = uniform_on_cell(lat, m, rng)
    code = VoronoiCode(lat, q, beta)
    codes, overload = code.encode(x, z)
    assert not overload.any()
    s = sq_dist(code.decode(codes, z), x) / d
    target = beta**2 * lat.normalized_second_moment * lat.volume ** (2 / d)
    se = s.std() / np.sqrt(m)
    assert se < 0.01 * target
    assert abs(s.mean() - target) < 5 * se, (s.mean(), target, se)


# --------------------------------------------------------- types and errors
def test_shapes_and_per_row_dither_with_leading_axes():
    code = VoronoiCode(E8(), 14, 0.25)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 8))
    z = uniform_on_cell(E8(), 6, rng).reshape(2, 3, 8)
    for backend in BACKENDS:
        codes, overload = code.encode(x, z, backend=backend)
        assert codes.shape == (2, 3, 8) and overload.shape == (2, 3)
        x_hat = code.decode(codes, z, backend=backend)
        assert x_hat.shape == (2, 3, 8) and x_hat.dtype == np.float64
        assert code.decode(codes, z, dtype=np.float32).dtype == np.float32
        np.testing.assert_array_equal(
            x_hat.reshape(6, 8),
            code.decode(codes.reshape(6, 8), z.reshape(6, 8), backend=backend))
        c1, o1 = code.encode(x[0, 0], z[0, 0], backend=backend)
        assert c1.shape == (8,) and o1.shape == ()
    # integer-valued float codes are accepted
    np.testing.assert_array_equal(code.decode(codes.astype(float), z),
                                  code.decode(codes, z))


@pytest.mark.parametrize("name", ["E8", "D4", "A2"])
def test_tensor_in_tensor_out(name):
    torch = pytest.importorskip("torch")
    lat = LATTICES[name]
    code = VoronoiCode(lat, 14, 0.3)
    x = np.random.default_rng(4).standard_normal((5, lat.dim)).astype(np.float32)
    codes, overload = code.encode(torch.from_numpy(x), backend="numba")
    assert isinstance(codes, torch.Tensor) and isinstance(overload, torch.Tensor)
    assert overload.dtype == torch.bool
    ref_codes, ref_overload = code.encode(x, backend="numpy")
    np.testing.assert_array_equal(codes.numpy().astype(np.int64), ref_codes)
    np.testing.assert_array_equal(overload.numpy(), ref_overload)
    x_hat = code.decode(codes, backend="numba")
    assert isinstance(x_hat, torch.Tensor) and x_hat.dtype == torch.float32
    np.testing.assert_array_equal(
        x_hat.numpy(), code.decode(ref_codes, dtype=np.float32, backend="numpy"))


def test_constructor_errors_name_the_argument():
    for bad_q in (1, 0, -3):
        with pytest.raises(ValueError, match="q must be >= 2"):
            VoronoiCode(E8(), bad_q)
    for bad_q in (2.5, 3.0, "4", True, None):
        with pytest.raises(ValueError, match="q must be an integer"):
            VoronoiCode(E8(), bad_q)
    for bad_beta in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match="beta must be finite and > 0"):
            VoronoiCode(E8(), 4, bad_beta)
    with pytest.raises(ValueError, match="beta must be a real number"):
        VoronoiCode(E8(), 4, "1")
    with pytest.raises(ValueError, match="lattice must be"):
        VoronoiCode("E8", 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_encode_decode_errors_name_the_argument(backend):
    code = VoronoiCode(E8(), 5, 0.5)
    x = np.zeros((3, 8))
    with pytest.raises(ValueError, match="x must have last dimension 8"):
        code.encode(np.zeros((3, 4)), backend=backend)
    for bad in (np.nan, np.inf):
        xb = x.copy()
        xb[2, 5] = bad
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            code.encode(xb, backend=backend)
    with pytest.raises(ValueError, match="dither must have last dimension 8"):
        code.encode(x, np.zeros(7), backend=backend)
    with pytest.raises(ValueError, match="dither must have shape"):
        code.encode(x, np.zeros((2, 8)), backend=backend)
    with pytest.raises(ValueError, match="dither contains NaN"):
        code.encode(x, np.full(8, np.nan), backend=backend)
    codes = np.zeros((3, 8), dtype=np.int64)
    with pytest.raises(ValueError, match="dither must have shape"):
        code.decode(codes, np.zeros((4, 8)), backend=backend)
    with pytest.raises(ValueError, match="codes must be integers"):
        code.decode(codes + 0.5, backend=backend)
    with pytest.raises(ValueError, match="codes must be integers"):
        code.decode(codes.astype(bool), backend=backend)
    for lo, hi in ((-1, 0), (0, 5), (0, 255)):
        bad = codes.copy()
        bad[0, 0], bad[1, 1] = lo, hi
        with pytest.raises(ValueError, match=r"codes must lie in \[0, q\)"):
            code.decode(bad, backend=backend)
    with pytest.raises(ValueError, match="codes must have last dimension 8"):
        code.decode(np.zeros((3, 4), dtype=np.int64), backend=backend)


def test_triton_on_numpy_arrays_is_refused():
    code = VoronoiCode(D4(), 4)
    with pytest.raises(RuntimeError, match="torch.Tensor"):
        code.encode(np.zeros(4), backend="triton")
    with pytest.raises(RuntimeError, match="torch.Tensor"):
        code.decode(np.zeros(4, dtype=np.uint8), backend="triton")


def test_codebook_guard():
    with pytest.raises(ValueError, match="too large"):
        VoronoiCode(E8(), 14).codebook()
