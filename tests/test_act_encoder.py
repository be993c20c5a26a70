"""The vectorised multiscale E8 encoder and the fast activation quantizer.

:func:`nqlib.kernels.cpu.nested.encode_multiscale_rows` decides ``LANES``
blocks at a time with SIMD arithmetic and hands the blocks it cannot decide
alone (a candidate on the boundary of ``q V``, every scale overloading,
huge inputs) to the scalar path. Its codes, scale indices, errors and
reconstructions must be those of the scalar kernel
(:func:`~nqlib.kernels.cpu.nested.encode_multiscale_rows_scalar`) and of the
numpy oracle (:func:`nqlib.reference.nested.encode_multiscale`), bit for
bit, ties included.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nqlib.kernels.cpu import nested
from nqlib.reference.nested import encode_multiscale


def _run(kernel, x, q, betas, z, want_dec=True):
    m = x.shape[0]
    codes = np.full((m, 8), -7, np.int64)
    index = np.full(m, -7, np.int64)
    err = np.full(m, np.nan)
    dec = np.full((m, 8), np.nan) if want_dec else np.empty((0, 8))
    kernel(x, q, betas, z, codes, index, err, dec)
    return codes, index, err, dec


def _assert_same(x, q, betas, z, oracle=True):
    """Vectorised == scalar (== oracle); returns the scale indices."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    betas = np.asarray(betas, dtype=np.float64)
    fast = _run(nested.encode_multiscale_rows, x, q, betas, z)
    slow = _run(nested.encode_multiscale_rows_scalar, x, q, betas, z)
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)
    # the same bits with the reconstruction skipped
    skip = _run(nested.encode_multiscale_rows, x, q, betas, z, want_dec=False)
    for a, b in zip(skip[:3], slow[:3]):
        np.testing.assert_array_equal(a, b)
    if oracle:
        rc, ri, re = encode_multiscale(x, q, betas, z)
        np.testing.assert_array_equal(fast[1], ri)
        np.testing.assert_array_equal(fast[0], rc)
        np.testing.assert_array_equal(fast[2], re)
    # the reconstruction is the decoder's
    out = np.empty((x.shape[0], 8))
    nested.decode_multiscale_rows(fast[0], fast[1], q, betas, z, out)
    np.testing.assert_array_equal(fast[3], out)
    return fast[1]


@pytest.mark.parametrize("q", [2, 3, 6, 7, 13, 14, 16, 255])
@pytest.mark.parametrize("m", [1, 31, 33, 257, 1000])
def test_vectorised_encoder_equals_scalar_and_oracle(q, m):
    """Gaussian and dyadic rows (many ties between cosets, between D8
    roundings and on Voronoi boundaries), counts that are not multiples of
    the lane or chunk sizes, shared and per-row dither."""
    rng = np.random.default_rng(1000 * q + m)
    x = np.vstack([rng.standard_normal((m, 8)) * 2.0,
                   rng.integers(-8, 9, (m, 8)) * 0.25])
    betas = np.array([0.3, 0.9, 2.5, 5.5, 12.0]) / q
    used = set()
    for z in (np.zeros((1, 8)), rng.uniform(-0.5, 0.5, (x.shape[0], 8))):
        used |= set(_assert_same(x, q, betas, z).tolist())
    if m >= 257:
        assert len(used) >= 3          # several scales: every path runs


def _facet_bound(t):
    """``max <t, r>`` over the roots ``r`` of E8, for the rows ``t`` (E8
    points): the two largest ``|t_j|``, or half the sum of ``|t_j|`` (less
    twice the least one when an odd number of coordinates is negative)."""
    a = np.abs(t)
    two = np.sort(a, axis=1)[:, -2:].sum(1)
    neg = (t < 0).sum(1)
    return np.maximum(two, 0.5 * (a.sum(1) - 2 * a.min(1) * (neg % 2)))


@pytest.mark.parametrize("q", [2, 3, 4, 6, 7, 8, 14])
def test_vectorised_encoder_on_the_boundary_of_qV(q):
    """Fine points exactly on the boundary of ``q V`` (``max <t, r> = q``),
    just inside and just outside: the blocks whose order puts a boundary
    candidate first go to the scalar path; all must agree."""
    rng = np.random.default_rng(200 + q)
    d = rng.integers(-q, q + 1, (40_000, 8)).astype(np.float64)
    d[:, 0] -= np.where(d.sum(1) % 2 == 1, np.sign(d[:, 0] + 0.5), 0)
    h = rng.integers(-q, q, (40_000, 8)) + 0.5
    h[:, 0] -= np.where((h - 0.5).sum(1) % 2 == 1, 1.0, 0.0)
    t = np.vstack([d, h])
    top = _facet_bound(t)
    assert np.sum(top == q) > 50
    pts = np.vstack([t[top == q][:2000], t[top == q - 1][:500],
                     t[top == q + 1][:500]])
    pts = pts[rng.permutation(len(pts))]
    for betas in (np.array([1.0, 1.5, 3.0]), np.array([1.0, 1.0, 0.5])):
        for z in (np.zeros((1, 8)), np.zeros((pts.shape[0], 8))):
            _assert_same(pts, q, betas, z)


def _boundary_points(q, rng, count):
    """``count`` E8 points with ``max <t, r> = q`` (on the boundary of
    ``q V``) and as many with ``max <t, r> < q``."""
    t = rng.integers(-q, q + 1, (200_000, 8)).astype(np.float64)
    t[:, 0] -= np.where(t.sum(1) % 2 == 1, np.sign(t[:, 0] + 0.5), 0)
    top = _facet_bound(t)
    on, inside = t[top == q][:count], t[top < q][:count]
    assert len(on) == count and len(inside) == count
    return on, inside


@pytest.mark.parametrize("q", [3, 6, 13])
@pytest.mark.parametrize("m", [1, 7, 9, 32, 37, 64])
def test_vectorised_encoder_boundary_lanes_in_any_position(q, m):
    """The full overload test runs on the boundary lanes gathered side by
    side: every lane on the boundary, none, only the last lane of each
    group (of 32) or of a partial one, and alternate lanes, at counts that
    fill a group partly, once, or more than once."""
    rng = np.random.default_rng(q * 100 + m)
    on, inside = _boundary_points(q, rng, m)
    last = inside.copy()
    last[31::32] = on[31::32]
    last[-1] = on[-1]
    alternate = inside.copy()
    alternate[::2] = on[::2]
    for x in (on, inside, last, alternate):
        for betas in (np.array([1.0]), np.array([1.0, 1.5, 3.0])):
            _assert_same(x, q, betas, np.zeros((1, 8)))


def test_vectorised_encoder_equal_errors_keep_the_lowest_index():
    """Repeated scales give equal errors: the lowest index wins, as in the
    scalar kernel and the oracle."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 8))
    index = _assert_same(x, 6, np.array([0.4, 0.4, 0.2, 0.4, 0.2]),
                         np.zeros((1, 8)))
    assert set(index.tolist()) <= {0, 2}


def test_vectorised_encoder_all_scales_overload():
    """Scales far too small: every candidate overloads and the block keeps
    the scale of the nearest actual output (the scalar fallback)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 8)) * 50.0
    _assert_same(x, 4, np.array([0.01, 0.02, 0.05]), np.zeros((1, 8)))


def test_vectorised_encoder_huge_inputs_take_the_scalar_path():
    """Inputs beyond the exact range of the lanes' float parity sum are
    coded by the scalar path (the same bits as the scalar kernel)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((100, 8))
    x[::7] *= 1e14
    _assert_same(x, 16, np.array([0.5, 1.0]), np.zeros((1, 8)), oracle=False)


def test_vectorised_encoder_refuses_a_short_output():
    x = np.zeros((10, 8))
    args = (x, 4, np.array([0.5]), np.zeros((1, 8)), np.empty((10, 8), np.int64),
            np.empty(10, np.int64), np.empty(10))
    with pytest.raises(ValueError, match="dec must have 0 or as many rows"):
        nested.encode_multiscale_rows(*args, np.empty((3, 8)))


@settings(max_examples=60)
@given(st.integers(0, 2**32 - 1), st.integers(1, 80), st.integers(2, 20),
       st.integers(1, 8), st.sampled_from([0.125, 0.25, 0.5, 1.0]),
       st.booleans())
def test_vectorised_encoder_property(seed, m, q, k, grid, dyadic):
    """Random shapes, nesting ratios, scale sets and inputs on coarse dyadic
    grids (ties everywhere) or in general position."""
    rng = np.random.default_rng(seed)
    if dyadic:
        x = rng.integers(-12, 13, (m, 8)) * grid
    else:
        x = rng.standard_normal((m, 8)) * rng.uniform(0.2, 4.0)
    betas = np.round(rng.uniform(0.05, 1.5, k) * 8) / 8 + 0.125
    z = (np.zeros((1, 8)) if rng.random() < 0.5
         else np.round(rng.uniform(-0.5, 0.5, (m, 8)) * 4) / 4)
    _assert_same(x, q, betas, z)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64, 4096])
def test_fwht_rows_is_the_butterflies_in_stage_order(n):
    """The numba transform (spans 1, 2, 4 on runs of 8 in registers, then
    the longer spans) gives the bits of the textbook butterflies, stage by
    stage (numpy, vectorised within each stage)."""
    from nqlib.kernels.cpu.hadamard import fwht_rows

    rng = np.random.default_rng(n)
    x = rng.standard_normal((5, n)) * np.exp(rng.uniform(-20, 20, (5, 1)))
    y = x.copy()
    h = 1
    while h < n:
        v = y.reshape(5, n // (2 * h), 2, h)
        a, b = v[:, :, 0, :].copy(), v[:, :, 1, :].copy()
        v[:, :, 0, :] = a + b
        v[:, :, 1, :] = a - b
        h *= 2
    y *= 1.0 / np.sqrt(n)
    out = x.copy()
    fwht_rows(out, 1.0 / np.sqrt(n))
    np.testing.assert_array_equal(out, y)


def test_e8_points_on_lanes_are_the_scalar_points():
    """The variable mode's nearest points, LANES blocks at a time, are the
    one-block-at-a-time points bit for bit: ties, dither, partial runs of
    lanes and inputs beyond LANE_LIMIT (the scalar path) included."""
    rng = np.random.default_rng(7)
    for m in (1, 31, 32, 33, 257, 3000):
        for scale in (1e-3, 0.3, 7.0, 1e13):
            x = rng.standard_normal((m, 8)) * scale
            x[::5] = np.round(x[::5] * 2) / 2          # half-integers: ties
            for z in (np.zeros((1, 8)), rng.uniform(-0.5, 0.5, (m, 8))):
                for inv_beta in (1.0, 0.77, 2.0**-3):
                    fast = np.full((m, 8), -99, np.int32)
                    slow = np.full((m, 8), -99, np.int32)
                    nested.e8_points_rows(x, inv_beta, z, fast)
                    nested.e8_points_rows_scalar(x, inv_beta, z, slow)
                    np.testing.assert_array_equal(fast, slow)


# ----------------------------------------------- the lean rows quantizer
def _same_matrix(q1, q2):
    assert q1.to_bytes() == q2.to_bytes()
    assert q1.alpha == q2.alpha
    np.testing.assert_array_equal(q1.coded_rows(), q2.coded_rows())
    for name in ("means", "norms"):
        np.testing.assert_array_equal(getattr(q1, name), getattr(q2, name))
    assert not q1.coded_rows().flags.writeable


@pytest.mark.parametrize("stream", (False, True))
@pytest.mark.parametrize("n", (8, 64, 384, 576, 1536))
@pytest.mark.parametrize("rate", (4.0, 3.3, 2.0, 1.0))
def test_fixed_rows_quantizer_is_quantize_columns(n, rate, stream):
    """The lean path of activations quantized on every call (which
    ``quantize_columns`` itself takes with ``keep_decoded=True``) gives the
    matrix of the general, chunked path bit for bit (file, shrinkage, side
    information) and the decode of that file: float32 and float64 rows,
    batches that take one word length or two, rates where blocks are
    dropped (sketching), zero and constant rows, a file's rate or a
    stream's; errors are the general function's."""
    from nqlib.quantizers.matrix import (
        FixedRowsQuantizer,
        QuantizedMatrix,
        quantize_columns,
    )

    rng = np.random.default_rng([n, int(10 * rate)])
    coder = FixedRowsQuantizer(rate, seed=11, stream=stream)
    for a in (1, 3, 17, 64):
        for dtype in (np.float32, np.float64):
            X = (rng.standard_normal((a, n)) * rng.uniform(0.1, 5)
                 + rng.uniform(-1, 1)).astype(dtype)
            if a >= 3:
                X[1] = 0.0
                X[2] = 2.5
            try:
                want = quantize_columns(X.T, rate, seed=11, mode="fixed",
                                        stream=stream)
            except ValueError as exc:     # a rate the shape cannot meet
                with pytest.raises(ValueError) as got:
                    coder(X)
                assert str(got.value) == str(exc)
                continue
            assert coder.takes(X)
            got = coder(X)
            _same_matrix(got, want)       # want's rows: the decode of its file
            np.testing.assert_array_equal(got.coded_rows(), QuantizedMatrix.from_bytes(
                got.to_bytes()).coded_rows())
            # the float32 rows of the fused product, from the same pass
            rows32 = np.full((a, n), np.nan, np.float32)
            again = coder.code(X, rows32=rows32)
            _same_matrix(again, want)
            np.testing.assert_array_equal(
                rows32, (got.coded_rows() * got.row_scales()[:, None]).astype(
                    np.float32))
            # the pass without the object, then the object; the domain and
            # the stream bytes known without it
            run = coder.run(X, rows32)
            assert coder.stream_nbytes(run) == got.stream_nbytes
            _same_matrix(coder.matrix(run), want)
            assert coder.domain(n) == (got.rotate, got.n_pad, got.center,
                                       got.version)


def test_fixed_rows_quantizer_hands_the_rest_to_quantize_columns():
    """Lengths that need padding, float16 rows, non-finite and oversized
    entries (which the compiled pass refuses, |x| sqrt(n) at the float32
    limit included) and empty batches take the general function, with its
    results and its errors; a file's length depends on its shape alone."""
    from nqlib.quantizers.matrix import FixedRowsQuantizer, quantize_columns

    coder = FixedRowsQuantizer(4.0, seed=5)
    rng = np.random.default_rng(0)
    for X in (rng.standard_normal((4, 100)), rng.standard_normal((4, 256)).astype(
            np.float16)):
        assert not coder.takes(X)
        _same_matrix(coder(X), quantize_columns(X.T, 4.0, seed=5, mode="fixed",
                                                keep_decoded=True))
    for bad, dtype in ((np.nan, np.float64), (np.inf, np.float64),
                       (1e38, np.float64), (-np.inf, np.float32),
                       (-3e37, np.float32)):
        X = rng.standard_normal((3, 256)).astype(dtype)
        X[1, 7] = bad
        assert coder.takes(X)          # the shape and dtype: the entries
        assert coder.code(X) is None    # are refused by the compiled pass
        with pytest.raises(ValueError) as want:
            quantize_columns(X.T, 4.0, seed=5, mode="fixed")
        with pytest.raises(ValueError) as got:
            coder(X)
        assert str(got.value) == str(want.value)
    with pytest.raises(ValueError, match="non-empty"):
        coder(np.zeros((0, 256)))
    X = rng.standard_normal((3, 64))
    for rows32 in (np.empty((3, 64)), np.empty((3, 63), np.float32),
                   np.empty((64, 3), np.float32).T, [[0.0] * 64] * 3):
        for method in (coder.code, coder.run):
            with pytest.raises(ValueError, match="rows32 must be"):
                method(X, rows32=rows32)
    frozen = np.empty((3, 64), np.float32)
    frozen.setflags(write=False)
    for method in (coder.code, coder.run):
        with pytest.raises(ValueError, match="rows32 must be"):
            method(X, rows32=frozen)
        assert method(rng.standard_normal((3, 60))) is None   # padded: no
        assert method(X.astype(np.float16)) is None           # not taken
    # the length of a shape's file is the same for any data
    sizes = {len(coder(X).to_bytes()) for X in
             (np.zeros((5, 128)), rng.standard_normal((5, 128)) * 1e3,
              np.ones((5, 128)), rng.standard_normal((5, 128)))}
    assert len(sizes) == 1
    with pytest.raises(ValueError, match="rate"):
        FixedRowsQuantizer(0.0)
