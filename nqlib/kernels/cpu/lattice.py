"""Numba closest-point and Voronoi-code kernels for Z^n, D_n, E8 and A2.

Every kernel follows the arithmetic contract of :mod:`nqlib.reference.lattices`
(float64 arithmetic, ``floor(v + 0.5)`` rounding, lowest-index tie rule for
D_n, strict comparison between cosets, distances summed in index order), so
that numpy, numba and Triton return the same bits. No ``fastmath``: it would
license reassociation and break that agreement.

Lattices are named by an integer ``kind`` (the ``KIND_*`` constants) so that
one compiled, cached kernel serves all of them. The per-vector helpers are
``inline="always"``: a call per row, passing several array structs, cost
3-4x the arithmetic for Z^n, D_n and A2 (benchmarks/lattices.py).
"""

import numpy as np
from numba import njit, prange

from nqlib.kernels.cpu.guard import guard_module

KIND_ZN = 0
KIND_DN = 1
KIND_E8 = 2
KIND_A2 = 3

SQRT3 = np.sqrt(3.0)
#: rows handled by one task of the parallel loops (scratch is per task)
CHUNK = 256


@njit(cache=True, inline="always")
def _round(v):
    return np.floor(v + 0.5)


@njit(cache=True, inline="always")
def _dn_into(v, shift, out):
    """out = D_n point nearest to ``v - shift`` plus ``shift``; returns the
    squared distance to ``v`` summed in index order.

    Written without data-dependent branches (selects instead), which makes
    it several times faster on random data: parity and the worst coordinate
    are unpredictable.
    """
    n = v.shape[0]
    parity = 0
    worst_j = 0
    worst_err = -1.0
    for j in range(n):
        u = v[j] - shift
        f = _round(u)
        out[j] = f
        parity += np.int64(f)
        err = abs(u - f)
        better = err > worst_err  # strict: the lowest index wins ties
        worst_err = err if better else worst_err
        worst_j = j if better else worst_j
    step = 1.0 if v[worst_j] - shift >= out[worst_j] else -1.0
    out[worst_j] += np.float64(parity & 1) * step
    d = 0.0
    for j in range(n):
        out[j] += shift
        e = v[j] - out[j]
        d += e * e
    return d


@njit(cache=True, inline="always")
def _rect_into(v, s0, s1, out):
    """Nearest point of (Z x sqrt3 Z) + (s0, s1) to v; returns squared distance."""
    out[0] = _round(v[0] - s0) + s0
    out[1] = _round((v[1] - s1) / SQRT3) * SQRT3 + s1
    e0 = v[0] - out[0]
    e1 = v[1] - out[1]
    return e0 * e0 + e1 * e1


@njit(cache=True, inline="always")
def closest_point_into(kind, v, out, tmp):
    """Nearest lattice point of the float64 vector ``v`` into ``out``.

    ``tmp`` is scratch of the same length (used by the two-coset lattices).
    """
    n = v.shape[0]
    if kind == KIND_ZN:
        for j in range(n):
            out[j] = _round(v[j])
    elif kind == KIND_DN:
        _dn_into(v, 0.0, out)
    elif kind == KIND_E8:
        d0 = _dn_into(v, 0.0, out)
        d1 = _dn_into(v, 0.5, tmp)
        pick = d1 < d0  # strict: the integer coset wins ties
        for j in range(n):
            out[j] = tmp[j] if pick else out[j]
    else:  # KIND_A2
        d0 = _rect_into(v, 0.0, 0.0, out)
        d1 = _rect_into(v, 0.5, SQRT3 / 2, tmp)
        pick = d1 < d0
        out[0] = tmp[0] if pick else out[0]
        out[1] = tmp[1] if pick else out[1]


@njit(cache=True, parallel=True)
def closest_point_rows(kind, x, out):
    """Nearest lattice point of every row of ``x`` (m, d) into ``out`` (m, d)."""
    m, d = x.shape
    nchunks = (m + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        v = np.empty(d)
        y = np.empty(d)
        tmp = np.empty(d)
        for i in range(c * CHUNK, min(m, (c + 1) * CHUNK)):
            for j in range(d):
                v[j] = x[i, j]
            closest_point_into(kind, v, y, tmp)
            for j in range(d):
                out[i, j] = y[j]


@njit(cache=True, inline="always")
def _coordinates_into(kind, Ginv, t, k):
    """Integer lattice coordinates ``k = round(G^-1 t)`` of the point ``t``.

    For E8 the product with the basis of :func:`nqlib.lattices.E8` is written
    out (suffix sums; every term is a half-integer, so the result equals the
    generic product exactly); other lattices use the generic product summed
    in index order.
    """
    d = t.shape[0]
    if kind == KIND_E8:
        t7 = t[7]
        s = 0.0
        for j in range(6, 0, -1):
            s += t[j]
            k[j] = np.int64(_round(s - (7 - j) * t7))
        k[0] = np.int64(_round((s + t[0] - 7.0 * t7) * 0.5))
        k[7] = np.int64(_round(2.0 * t7))
        return
    for j in range(d):
        s = Ginv[j, 0] * t[0]
        for jj in range(1, d):
            s = s + Ginv[j, jj] * t[jj]
        k[j] = np.int64(_round(s))


@njit(cache=True, inline="always")
def _point_into(kind, G, c, y):
    """``y = G c`` for integer coordinates ``c`` (E8 written out; exact)."""
    d = y.shape[0]
    if kind == KIND_E8:
        h = 0.5 * np.float64(c[7])
        y[0] = (2.0 * np.float64(c[0]) - np.float64(c[1])) + h
        for j in range(1, 6):
            y[j] = (np.float64(c[j]) - np.float64(c[j + 1])) + h
        y[6] = np.float64(c[6]) + h
        y[7] = h
        return
    for j in range(d):
        s = G[j, 0] * np.float64(c[0])
        for jj in range(1, d):
            s = s + G[j, jj] * np.float64(c[jj])
        y[j] = s


@njit(cache=True, inline="always")
def mod_floor(a, q):
    """``a mod q`` in ``[0, q)`` for an integer-valued ``a`` (float64).

    Float division is exact enough here (``|a| << 2^50``) and much cheaper
    than an integer modulo."""
    af = np.float64(a)
    return af - q * np.floor(af / q)


@njit(cache=True, inline="always")
def encode_into(kind, v, q, G, Ginv, codes_row, k, uk, t, w, tmp):
    """Encode the float64 vector ``v`` (already scaled and dithered).

    ``t = Q(v)``, ``k = G^-1 t``; writes ``k mod q`` into ``codes_row`` and
    returns True on overload: when the decoder, which sees ``y = G c``, would
    not return ``t``, i.e. when ``G^-1 Q(y / q) != (c - k) / q`` (integer
    comparison). ``k``, ``uk`` (int64), ``t``, ``w``, ``tmp`` are scratch.
    """
    d = v.shape[0]
    closest_point_into(kind, v, t, tmp)
    _coordinates_into(kind, Ginv, t, k)
    for j in range(d):
        codes_row[j] = np.int64(mod_floor(k[j], q))
    _point_into(kind, G, codes_row, w)
    for j in range(d):
        w[j] = w[j] / q
    closest_point_into(kind, w, t, tmp)
    _coordinates_into(kind, Ginv, t, uk)
    overload = False
    for j in range(d):
        if uk[j] * q != codes_row[j] - k[j]:
            overload = True
    return overload


@njit(cache=True, inline="always")
def decode_into(kind, codes_row, q, G, beta, z, out, y, w, tmp):
    """``out = beta * ((y - q Q(y / q)) - z)`` with ``y = G c``."""
    d = out.shape[0]
    _point_into(kind, G, codes_row, y)
    for j in range(d):
        w[j] = y[j] / q
    closest_point_into(kind, w, out, tmp)
    for j in range(d):
        out[j] = beta * ((y[j] - q * out[j]) - z[j])


@njit(cache=True, parallel=True)
def encode_rows(kind, x, q, beta, z, G, Ginv, codes, overload):
    """Voronoi-encode every row of ``x`` (m, d).

    ``z`` is the dither, shape (1, d) (shared) or (m, d) (per row). Writes
    ``codes`` (m, d) integers in [0, q) and ``overload`` (m,) booleans.
    """
    m, d = x.shape
    zm = z.shape[0]
    nchunks = (m + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        v = np.empty(d)
        t = np.empty(d)
        w = np.empty(d)
        tmp = np.empty(d)
        crow = np.empty(d, dtype=np.int64)
        k = np.empty(d, dtype=np.int64)
        uk = np.empty(d, dtype=np.int64)
        for i in range(c * CHUNK, min(m, (c + 1) * CHUNK)):
            iz = i if zm > 1 else 0
            for j in range(d):
                v[j] = np.float64(x[i, j]) / beta + z[iz, j]
            overload[i] = encode_into(kind, v, q, G, Ginv, crow, k, uk, t, w,
                                      tmp)
            for j in range(d):
                codes[i, j] = crow[j]


@njit(cache=True, parallel=True)
def decode_rows(kind, codes, q, beta, z, G, out):
    """Voronoi-decode every row of ``codes`` (m, d) into ``out`` (m, d)."""
    m, d = codes.shape
    zm = z.shape[0]
    nchunks = (m + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        y = np.empty(d)
        w = np.empty(d)
        tmp = np.empty(d)
        r = np.empty(d)
        for i in range(c * CHUNK, min(m, (c + 1) * CHUNK)):
            iz = i if zm > 1 else 0
            decode_into(kind, codes[i], q, G, beta, z[iz], r, y, w, tmp)
            for j in range(d):
                out[i, j] = r[j]


# ---------------------------------------------------------------------------
# E8, specialised: the same arithmetic with the dimension fixed at 8, so that
# LLVM unrolls every loop and keeps the vectors in registers (about 3x faster
# than the generic kernels above). Results are identical to theirs.
# ---------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _d8_into(v, shift, out):
    """D8 point nearest to ``v - shift``, plus ``shift``; returns the squared
    distance to ``v`` (index order). Same rule as :func:`_dn_into`."""
    parity = 0
    worst_j = 0
    worst_err = -1.0
    for j in range(8):
        u = v[j] - shift
        f = _round(u)
        out[j] = f
        parity += np.int64(f)
        err = abs(u - f)
        better = err > worst_err
        worst_err = err if better else worst_err
        worst_j = j if better else worst_j
    step = 1.0 if v[worst_j] - shift >= out[worst_j] else -1.0
    out[worst_j] += np.float64(parity & 1) * step
    d = 0.0
    for j in range(8):
        out[j] += shift
        e = v[j] - out[j]
        d += e * e
    return d


@njit(cache=True, inline="always")
def e8_into(v, out, tmp):
    """Nearest E8 point of the float64 8-vector ``v`` into ``out``; ``tmp`` is
    scratch. The integer coset wins ties (the half-integer one must be
    strictly nearer)."""
    d0 = _d8_into(v, 0.0, out)
    d1 = _d8_into(v, 0.5, tmp)
    pick = d1 < d0
    for j in range(8):
        out[j] = tmp[j] if pick else out[j]


@njit(cache=True, inline="always")
def e8_coordinates(t, k):
    """Write ``k = G^-1 t`` for the basis of :func:`nqlib.lattices.E8`
    (suffix sums; exact for lattice points ``t``)."""
    t7 = t[7]
    s = 0.0
    for j in range(6, 0, -1):
        s += t[j]
        k[j] = np.int64(_round(s - (7 - j) * t7))
    k[0] = np.int64(_round((s + t[0] - 7.0 * t7) * 0.5))
    k[7] = np.int64(_round(2.0 * t7))


@njit(cache=True, inline="always")
def _e8_point(c, y):
    # y = G c for the basis of nqlib.lattices.E8 (exact in float64).
    h = 0.5 * np.float64(c[7])
    y[0] = (2.0 * np.float64(c[0]) - np.float64(c[1])) + h
    for j in range(1, 6):
        y[j] = (np.float64(c[j]) - np.float64(c[j + 1])) + h
    y[6] = np.float64(c[6]) + h
    y[7] = h


@njit(cache=True, inline="always")
def encode_e8_into(v, q, codes_row, k, uk, t, w, tmp, u):
    """E8 version of :func:`encode_into` (same contract, same results).

    On return ``t`` holds the fine point ``Q(v)``; ``w``, ``tmp``, ``u`` are
    scratch.
    """
    e8_into(v, t, tmp)
    return wrap_e8_into(t, q, codes_row, k, uk, w, tmp, u)


@njit(cache=True, inline="always")
def wrap_e8_into(t, q, codes_row, k, uk, w, tmp, u):
    """Codes ``(G^-1 t) mod q`` of the E8 point ``t`` into ``codes_row``;
    returns True on overload (the decoder would not return ``t``)."""
    e8_coordinates(t, k)
    for j in range(8):
        codes_row[j] = np.int64(mod_floor(k[j], q))
    _e8_point(codes_row, w)
    for j in range(8):
        w[j] = w[j] / q
    e8_into(w, u, tmp)
    e8_coordinates(u, uk)
    bad = 0
    for j in range(8):
        bad += uk[j] * q != codes_row[j] - k[j]
    return bad > 0


@njit(cache=True, inline="always")
def decode_e8_into(codes_row, q, beta, z, out, y, w, tmp):
    """E8 version of :func:`decode_into` (same contract, same results)."""
    _e8_point(codes_row, y)
    for j in range(8):
        w[j] = y[j] / q
    e8_into(w, out, tmp)
    for j in range(8):
        out[j] = beta * ((y[j] - q * out[j]) - z[j])


@njit(cache=True, parallel=True)
def closest_point_e8_rows(x, out):
    """Nearest E8 point of every row of ``x`` (m, 8) into ``out`` (m, 8)."""
    m = x.shape[0]
    nchunks = (m + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        v = np.empty(8)
        y = np.empty(8)
        tmp = np.empty(8)
        for i in range(c * CHUNK, min(m, (c + 1) * CHUNK)):
            for j in range(8):
                v[j] = x[i, j]
            e8_into(v, y, tmp)
            for j in range(8):
                out[i, j] = y[j]


@njit(cache=True, parallel=True)
def encode_e8_rows(x, q, beta, z, codes, overload):
    """E8 version of :func:`encode_rows` (no generator arguments)."""
    m = x.shape[0]
    zm = z.shape[0]
    nchunks = (m + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        v = np.empty(8)
        t = np.empty(8)
        w = np.empty(8)
        tmp = np.empty(8)
        u = np.empty(8)
        crow = np.empty(8, dtype=np.int64)
        k = np.empty(8, dtype=np.int64)
        uk = np.empty(8, dtype=np.int64)
        for i in range(c * CHUNK, min(m, (c + 1) * CHUNK)):
            iz = i if zm > 1 else 0
            for j in range(8):
                v[j] = np.float64(x[i, j]) / beta + z[iz, j]
            overload[i] = encode_e8_into(v, q, crow, k, uk, t, w, tmp, u)
            for j in range(8):
                codes[i, j] = crow[j]


@njit(cache=True, parallel=True)
def decode_e8_rows(codes, q, beta, z, out):
    """E8 version of :func:`decode_rows` (no generator argument)."""
    m = codes.shape[0]
    zm = z.shape[0]
    nchunks = (m + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        y = np.empty(8)
        w = np.empty(8)
        tmp = np.empty(8)
        r = np.empty(8)
        crow = np.empty(8, dtype=np.int64)
        for i in range(c * CHUNK, min(m, (c + 1) * CHUNK)):
            iz = i if zm > 1 else 0
            for j in range(8):
                crow[j] = codes[i, j]
            decode_e8_into(crow, q, beta, z[iz], r, y, w, tmp)
            for j in range(8):
                out[i, j] = r[j]


# serialised when numba's threading layer is not thread-safe
guard_module(globals())
