"""Numba kernels of the matrix quantizer: E8 blocks at one or several scales,
and fixed-length bit packing.

Arrays in, arrays out. Arithmetic follows :mod:`nqlib.kernels.cpu.lattice`.
"""

import numpy as np
from numba import njit, prange

from nqlib.kernels.cpu.guard import guard_module, guarded, serial, threadsafe
from nqlib.kernels.cpu.lattice import (
    CHUNK,
    decode_e8_into,
    e8_coordinates,
    e8_into,
    mod_floor,
    wrap_e8_into,
)


@njit(cache=True, inline="always")
def _root_max(t):
    """``max <t, r>`` over the 240 roots ``r`` of E8 (the Voronoi-relevant
    vectors): the two largest ``|t_i|`` (roots ``+-e_i +- e_j``), or half
    the sum of ``|t_i|`` with an even number of sign flips (roots
    ``(+-1/2)^8``; when ``t`` has an odd number of negative coordinates the
    smallest ``|t_i|`` pays). Exact for points of E8 (dyadic arithmetic)."""
    s = 0.0
    a1 = 0.0
    a2 = 0.0
    amin = np.inf
    neg = 0
    for j in range(8):
        a = abs(t[j])
        s += a
        neg += t[j] < 0.0
        amin = min(amin, a)
        if a > a1:
            a2 = a1
            a1 = a
        elif a > a2:
            a2 = a
    half = 0.5 * (s - 2.0 * amin) if neg & 1 else 0.5 * s
    return max(a1 + a2, half)


@njit(cache=True, inline="always")
def _wrap_e8_fast(t, q, codes_row, k, uk, w, tmp, u):
    """:func:`wrap_e8_into`, deciding overload from the facets of ``q V``.

    The Voronoi cell of E8 is ``{y : <y, r> <= 1}`` over its 240 roots, so
    for the fine point ``t``: ``max <t, r> < q`` means ``t`` is inside ``q V``
    (no overload) and ``> q`` means outside (overload), both with a margin
    of at least 1 in ``<t, r>`` (E8 is an integral lattice: ``<t, r>`` is an
    integer), far beyond float64 error -- the full test finds the same. Equality is a
    tie on the boundary, decided by the full test (same rule as every other
    backend). On overload the codes are not written (the caller moves on).
    """
    m = _root_max(t)
    if m < q:
        e8_coordinates(t, k)
        for j in range(8):
            codes_row[j] = np.int64(mod_floor(k[j], q))
        return False
    if m > q:
        return True
    return wrap_e8_into(t, q, codes_row, k, uk, w, tmp, u)


@njit(cache=True, parallel=True)
def e8_points_rows_scalar(x, inv_beta, z, out2):
    """``out2 = 2 Q_E8(x * inv_beta + z)`` as integers, for rows of ``x`` (m, 8).

    ``z`` is (1, 8) or (m, 8). Twice the point is an integer vector (all even:
    the D8 coset; all odd: the D8 + 1/2 coset). One block at a time (the
    reference of :func:`e8_points_rows`).
    """
    m = x.shape[0]
    nchunks = (m + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        v = np.empty(8)
        t = np.empty(8)
        tmp = np.empty(8)
        for i in range(c * CHUNK, min(m, (c + 1) * CHUNK)):
            _point_block(x, i, inv_beta, z, v, t, tmp, out2)


@njit(cache=True, inline="always")
def _point_block(x, i, inv_beta, z, v, t, tmp, out2):
    """Row ``i`` of :func:`e8_points_rows_scalar` (``v``, ``t``, ``tmp``:
    scratch of 8)."""
    iz = i if z.shape[0] > 1 else 0
    for j in range(8):
        v[j] = x[i, j] * inv_beta + z[iz, j]
    e8_into(v, t, tmp)
    for j in range(8):
        out2[i, j] = np.int32(2.0 * t[j])


@njit(cache=True)
def _encode_block(x, i, q, betas, z, iz, want_dec, codes, index, sqerr, dec,
                  v, T, g, done, t, w, tmp, u, y, r, crow, kk, uk):
    """Row ``i`` of :func:`encode_multiscale_rows`, one block at a time (the
    scalar path; the arguments after ``dec`` are scratch). Compiled once,
    not inlined: the kernels that call it compile in a fraction of the time
    (it holds the whole E8 decoder several times over)."""
    k = betas.shape[0]
    for s in range(k):
        beta = betas[s]
        for j in range(8):
            v[j] = x[i, j] / beta + z[iz, j]
        Ts = T[s]                  # the fine point, written in place
        e8_into(v, Ts, tmp)
        e = 0.0
        for j in range(8):
            d = beta * (Ts[j] - z[iz, j]) - x[i, j]
            e += d * d
        g[s] = e
        done[s] = False
    found = -1
    for _ in range(k):
        s_min = -1
        for s in range(k):
            if not done[s] and (s_min < 0 or g[s] < g[s_min]):
                s_min = s
        done[s_min] = True
        if not _wrap_e8_fast(T[s_min], q, crow, kk, uk, w, tmp, u):
            found = s_min
            break
    if found >= 0:
        # crow already holds the codes of the last wrapped, i.e. the
        # kept, candidate
        best_err = g[found]
        if want_dec:
            beta = betas[found]
            for j in range(8):
                dec[i, j] = beta * (T[found, j] - z[iz, j])
    else:
        # every scale overloads: keep the nearest actual output
        best_err = np.inf
        for s in range(k):
            for j in range(8):
                t[j] = T[s, j]
            wrap_e8_into(t, q, crow, kk, uk, w, tmp, u)
            decode_e8_into(crow, q, betas[s], z[iz], r, y, w, tmp)
            e = 0.0
            for j in range(8):
                d = r[j] - x[i, j]
                e += d * d
            if e < best_err:
                best_err = e
                found = s
        for j in range(8):
            t[j] = T[found, j]
        wrap_e8_into(t, q, crow, kk, uk, w, tmp, u)
        if want_dec:
            decode_e8_into(crow, q, betas[found], z[iz], r, y, w, tmp)
            for j in range(8):
                dec[i, j] = r[j]
    index[i] = found
    sqerr[i] = best_err
    for j in range(8):
        codes[i, j] = crow[j]


@njit(cache=True, inline="always")
def _block_scratch(k):
    """The scratch arrays of :func:`_encode_block` for ``k`` scales, in its
    argument order (``v, T, g, done, t, w, tmp, u, y, r, crow, kk, uk``):
    views of three allocations (a call on a few blocks, e.g. one row of a
    batch-1 layer, would otherwise spend much of its time allocating)."""
    f = np.empty(56 + 9 * k)
    i = np.empty(24, dtype=np.int64)
    return (f[0:8], f[56:56 + 8 * k].reshape(k, 8), f[56 + 8 * k:56 + 9 * k],
            np.empty(k, dtype=np.bool_), f[8:16], f[16:24], f[24:32],
            f[32:40], f[40:48], f[48:56], i[0:8], i[8:16], i[16:24])


@njit(cache=True, parallel=True)
def encode_multiscale_rows_scalar(x, q, betas, z, codes, index, sqerr, dec):
    """:func:`encode_multiscale_rows` one block at a time: the same contract
    and the same bits (the reference the vectorised kernel is tested
    against, and its path for the blocks it does not decide)."""
    m = x.shape[0]
    if dec.shape[0] != 0 and dec.shape[0] != m:
        raise ValueError("dec must have 0 or as many rows as x")
    want_dec = dec.shape[0] > 0
    k = betas.shape[0]
    zm = z.shape[0]
    nchunks = (m + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        v, T, g, done, t, w, tmp, u, y, r, crow, kk, uk = _block_scratch(k)
        for i in range(c * CHUNK, min(m, (c + 1) * CHUNK)):
            iz = i if zm > 1 else 0
            _encode_block(x, i, q, betas, z, iz, want_dec, codes, index, sqerr,
                          dec, v, T, g, done, t, w, tmp, u, y, r, crow, kk, uk)


# ---------------------------------------------------------------------------
# The multiscale encoder vectorised over blocks: ``LANES`` blocks at a time,
# coordinate-major, one SIMD lane per block (:func:`_scale_lanes`). Each step
# is the arithmetic of the scalar helpers above, operation for operation (the
# same roundings, the same tie rules, sums in index order), hence the same
# bits. The full overload test of a candidate on the boundary of q V runs on
# the lanes too (:func:`_wrap_lanes`); the rare blocks that need more (two
# boundary candidates, every scale overloading) go through the scalar path.
# ---------------------------------------------------------------------------

#: blocks per vector step of :func:`encode_multiscale_rows`
LANES = 32
#: inputs with ``|x| / min(beta) + |z|`` at most this take the vector path:
#: its coset parity is a float sum of the rounded coordinates, exact far
#: below 2^53 (the scalar path sums them as int64)
LANE_LIMIT = 2.0 ** 40


@njit(cache=True, error_model="numpy")
def _scale_lanes(XZ, beta, nw, OUT, dither):
    """One scale for lanes ``0 .. nw - 1``: ``XZ`` holds the blocks
    (coordinate ``j`` of lane ``w`` at ``j LANES + w``) and then their dither
    (at ``(8 + j) LANES + w``; read only when ``dither``, else taken as 0);
    writes the fine point ``Q(x / beta + z)`` (coordinate ``j`` at ``j
    LANES + w``), the granular error (row 8) and ``max <t, r>`` over the
    roots (row 9) into ``OUT``. Flat arrays with
    constant row offsets: LLVM then checks their overlap once. Written out
    coordinate by coordinate (no inner loop, no branch) so that LLVM runs
    the loop over the lanes on SIMD registers: the operations of
    :func:`~nqlib.kernels.cpu.lattice.e8_into` and :func:`_root_max`, in
    their order."""
    for w in range(nw):
        x0 = XZ[w]
        x1 = XZ[1 * LANES + w]
        x2 = XZ[2 * LANES + w]
        x3 = XZ[3 * LANES + w]
        x4 = XZ[4 * LANES + w]
        x5 = XZ[5 * LANES + w]
        x6 = XZ[6 * LANES + w]
        x7 = XZ[7 * LANES + w]
        z0 = XZ[8 * LANES + w] if dither else 0.0
        z1 = XZ[9 * LANES + w] if dither else 0.0
        z2 = XZ[10 * LANES + w] if dither else 0.0
        z3 = XZ[11 * LANES + w] if dither else 0.0
        z4 = XZ[12 * LANES + w] if dither else 0.0
        z5 = XZ[13 * LANES + w] if dither else 0.0
        z6 = XZ[14 * LANES + w] if dither else 0.0
        z7 = XZ[15 * LANES + w] if dither else 0.0
        v0 = x0 / beta + z0
        v1 = x1 / beta + z1
        v2 = x2 / beta + z2
        v3 = x3 / beta + z3
        v4 = x4 / beta + z4
        v5 = x5 / beta + z5
        v6 = x6 / beta + z6
        v7 = x7 / beta + z7
        # D8 + 0.0: nearest point, parity fix on the worst coordinate
        u00 = v0 - 0.0
        f00 = np.floor(u00 + 0.5)
        u01 = v1 - 0.0
        f01 = np.floor(u01 + 0.5)
        u02 = v2 - 0.0
        f02 = np.floor(u02 + 0.5)
        u03 = v3 - 0.0
        f03 = np.floor(u03 + 0.5)
        u04 = v4 - 0.0
        f04 = np.floor(u04 + 0.5)
        u05 = v5 - 0.0
        f05 = np.floor(u05 + 0.5)
        u06 = v6 - 0.0
        f06 = np.floor(u06 + 0.5)
        u07 = v7 - 0.0
        f07 = np.floor(u07 + 0.5)
        par = f00 + f01 + f02 + f03 + f04 + f05 + f06 + f07
        we = -1.0
        wj = 0.0
        wu = 0.0
        wf = 0.0
        e = abs(u00 - f00)
        b = e > we
        we = e if b else we
        wj = 0.0 if b else wj
        wu = u00 if b else wu
        wf = f00 if b else wf
        e = abs(u01 - f01)
        b = e > we
        we = e if b else we
        wj = 1.0 if b else wj
        wu = u01 if b else wu
        wf = f01 if b else wf
        e = abs(u02 - f02)
        b = e > we
        we = e if b else we
        wj = 2.0 if b else wj
        wu = u02 if b else wu
        wf = f02 if b else wf
        e = abs(u03 - f03)
        b = e > we
        we = e if b else we
        wj = 3.0 if b else wj
        wu = u03 if b else wu
        wf = f03 if b else wf
        e = abs(u04 - f04)
        b = e > we
        we = e if b else we
        wj = 4.0 if b else wj
        wu = u04 if b else wu
        wf = f04 if b else wf
        e = abs(u05 - f05)
        b = e > we
        we = e if b else we
        wj = 5.0 if b else wj
        wu = u05 if b else wu
        wf = f05 if b else wf
        e = abs(u06 - f06)
        b = e > we
        we = e if b else we
        wj = 6.0 if b else wj
        wu = u06 if b else wu
        wf = f06 if b else wf
        e = abs(u07 - f07)
        b = e > we
        we = e if b else we
        wj = 7.0 if b else wj
        wu = u07 if b else wu
        wf = f07 if b else wf
        fix = (par - 2.0 * np.floor(par * 0.5)) * (1.0 if wu >= wf else -1.0)
        d0 = 0.0
        o00 = (f00 + fix if wj == 0.0 else f00) + 0.0
        e = v0 - o00
        d0 += e * e
        o01 = (f01 + fix if wj == 1.0 else f01) + 0.0
        e = v1 - o01
        d0 += e * e
        o02 = (f02 + fix if wj == 2.0 else f02) + 0.0
        e = v2 - o02
        d0 += e * e
        o03 = (f03 + fix if wj == 3.0 else f03) + 0.0
        e = v3 - o03
        d0 += e * e
        o04 = (f04 + fix if wj == 4.0 else f04) + 0.0
        e = v4 - o04
        d0 += e * e
        o05 = (f05 + fix if wj == 5.0 else f05) + 0.0
        e = v5 - o05
        d0 += e * e
        o06 = (f06 + fix if wj == 6.0 else f06) + 0.0
        e = v6 - o06
        d0 += e * e
        o07 = (f07 + fix if wj == 7.0 else f07) + 0.0
        e = v7 - o07
        d0 += e * e
        # D8 + 0.5: nearest point, parity fix on the worst coordinate
        u10 = v0 - 0.5
        f10 = np.floor(u10 + 0.5)
        u11 = v1 - 0.5
        f11 = np.floor(u11 + 0.5)
        u12 = v2 - 0.5
        f12 = np.floor(u12 + 0.5)
        u13 = v3 - 0.5
        f13 = np.floor(u13 + 0.5)
        u14 = v4 - 0.5
        f14 = np.floor(u14 + 0.5)
        u15 = v5 - 0.5
        f15 = np.floor(u15 + 0.5)
        u16 = v6 - 0.5
        f16 = np.floor(u16 + 0.5)
        u17 = v7 - 0.5
        f17 = np.floor(u17 + 0.5)
        par = f10 + f11 + f12 + f13 + f14 + f15 + f16 + f17
        we = -1.0
        wj = 0.0
        wu = 0.0
        wf = 0.0
        e = abs(u10 - f10)
        b = e > we
        we = e if b else we
        wj = 0.0 if b else wj
        wu = u10 if b else wu
        wf = f10 if b else wf
        e = abs(u11 - f11)
        b = e > we
        we = e if b else we
        wj = 1.0 if b else wj
        wu = u11 if b else wu
        wf = f11 if b else wf
        e = abs(u12 - f12)
        b = e > we
        we = e if b else we
        wj = 2.0 if b else wj
        wu = u12 if b else wu
        wf = f12 if b else wf
        e = abs(u13 - f13)
        b = e > we
        we = e if b else we
        wj = 3.0 if b else wj
        wu = u13 if b else wu
        wf = f13 if b else wf
        e = abs(u14 - f14)
        b = e > we
        we = e if b else we
        wj = 4.0 if b else wj
        wu = u14 if b else wu
        wf = f14 if b else wf
        e = abs(u15 - f15)
        b = e > we
        we = e if b else we
        wj = 5.0 if b else wj
        wu = u15 if b else wu
        wf = f15 if b else wf
        e = abs(u16 - f16)
        b = e > we
        we = e if b else we
        wj = 6.0 if b else wj
        wu = u16 if b else wu
        wf = f16 if b else wf
        e = abs(u17 - f17)
        b = e > we
        we = e if b else we
        wj = 7.0 if b else wj
        wu = u17 if b else wu
        wf = f17 if b else wf
        fix = (par - 2.0 * np.floor(par * 0.5)) * (1.0 if wu >= wf else -1.0)
        d1 = 0.0
        o10 = (f10 + fix if wj == 0.0 else f10) + 0.5
        e = v0 - o10
        d1 += e * e
        o11 = (f11 + fix if wj == 1.0 else f11) + 0.5
        e = v1 - o11
        d1 += e * e
        o12 = (f12 + fix if wj == 2.0 else f12) + 0.5
        e = v2 - o12
        d1 += e * e
        o13 = (f13 + fix if wj == 3.0 else f13) + 0.5
        e = v3 - o13
        d1 += e * e
        o14 = (f14 + fix if wj == 4.0 else f14) + 0.5
        e = v4 - o14
        d1 += e * e
        o15 = (f15 + fix if wj == 5.0 else f15) + 0.5
        e = v5 - o15
        d1 += e * e
        o16 = (f16 + fix if wj == 6.0 else f16) + 0.5
        e = v6 - o16
        d1 += e * e
        o17 = (f17 + fix if wj == 7.0 else f17) + 0.5
        e = v7 - o17
        d1 += e * e
        pick = d1 < d0
        g = 0.0
        s = 0.0
        a1 = 0.0
        a2 = 0.0
        amin = np.inf
        neg = 0.0
        t = o10 if pick else o00
        OUT[w] = t
        e = beta * (t - z0) - x0
        g += e * e
        a = abs(t)
        s += a
        neg += 1.0 if t < 0.0 else 0.0
        amin = min(amin, a)
        up1 = a > a1
        a2 = a1 if up1 else (a if a > a2 else a2)
        a1 = a if up1 else a1
        t = o11 if pick else o01
        OUT[1 * LANES + w] = t
        e = beta * (t - z1) - x1
        g += e * e
        a = abs(t)
        s += a
        neg += 1.0 if t < 0.0 else 0.0
        amin = min(amin, a)
        up1 = a > a1
        a2 = a1 if up1 else (a if a > a2 else a2)
        a1 = a if up1 else a1
        t = o12 if pick else o02
        OUT[2 * LANES + w] = t
        e = beta * (t - z2) - x2
        g += e * e
        a = abs(t)
        s += a
        neg += 1.0 if t < 0.0 else 0.0
        amin = min(amin, a)
        up1 = a > a1
        a2 = a1 if up1 else (a if a > a2 else a2)
        a1 = a if up1 else a1
        t = o13 if pick else o03
        OUT[3 * LANES + w] = t
        e = beta * (t - z3) - x3
        g += e * e
        a = abs(t)
        s += a
        neg += 1.0 if t < 0.0 else 0.0
        amin = min(amin, a)
        up1 = a > a1
        a2 = a1 if up1 else (a if a > a2 else a2)
        a1 = a if up1 else a1
        t = o14 if pick else o04
        OUT[4 * LANES + w] = t
        e = beta * (t - z4) - x4
        g += e * e
        a = abs(t)
        s += a
        neg += 1.0 if t < 0.0 else 0.0
        amin = min(amin, a)
        up1 = a > a1
        a2 = a1 if up1 else (a if a > a2 else a2)
        a1 = a if up1 else a1
        t = o15 if pick else o05
        OUT[5 * LANES + w] = t
        e = beta * (t - z5) - x5
        g += e * e
        a = abs(t)
        s += a
        neg += 1.0 if t < 0.0 else 0.0
        amin = min(amin, a)
        up1 = a > a1
        a2 = a1 if up1 else (a if a > a2 else a2)
        a1 = a if up1 else a1
        t = o16 if pick else o06
        OUT[6 * LANES + w] = t
        e = beta * (t - z6) - x6
        g += e * e
        a = abs(t)
        s += a
        neg += 1.0 if t < 0.0 else 0.0
        amin = min(amin, a)
        up1 = a > a1
        a2 = a1 if up1 else (a if a > a2 else a2)
        a1 = a if up1 else a1
        t = o17 if pick else o07
        OUT[7 * LANES + w] = t
        e = beta * (t - z7) - x7
        g += e * e
        a = abs(t)
        s += a
        neg += 1.0 if t < 0.0 else 0.0
        amin = min(amin, a)
        up1 = a > a1
        a2 = a1 if up1 else (a if a > a2 else a2)
        a1 = a if up1 else a1
        half = (0.5 * (s - 2.0 * amin) if neg - 2.0 * np.floor(neg * 0.5) > 0.0
                else 0.5 * s)
        OUT[8 * LANES + w] = g
        OUT[9 * LANES + w] = max(a1 + a2, half)


@njit(cache=True, error_model="numpy")
def _wrap_lanes(T, nw, q, OUT, full):
    """:func:`~nqlib.kernels.cpu.lattice.wrap_e8_into` for lanes ``0 .. nw -
    1`` of the E8 points ``T`` (coordinate ``j`` of lane ``w`` at ``j LANES
    + w``): the codes ``k mod q`` (``k = G^-1 t``) into ``OUT`` (row ``j``,
    as floats) and, when ``full``, the overload flag into row 8 (1.0: the
    decoder, which sees ``y = G c``, would not return ``t``). The same
    operations as the scalar helpers, written out coordinate by coordinate
    (see :func:`_scale_lanes`); integers are exact in float64 here."""
    qf = np.float64(q)
    for w in range(nw):
        t0 = T[w]
        t1 = T[1 * LANES + w]
        t2 = T[2 * LANES + w]
        t3 = T[3 * LANES + w]
        t4 = T[4 * LANES + w]
        t5 = T[5 * LANES + w]
        t6 = T[6 * LANES + w]
        t7 = T[7 * LANES + w]
        s = 0.0
        s += t6
        k6 = np.floor((s - 1.0 * t7) + 0.5)
        s += t5
        k5 = np.floor((s - 2.0 * t7) + 0.5)
        s += t4
        k4 = np.floor((s - 3.0 * t7) + 0.5)
        s += t3
        k3 = np.floor((s - 4.0 * t7) + 0.5)
        s += t2
        k2 = np.floor((s - 5.0 * t7) + 0.5)
        s += t1
        k1 = np.floor((s - 6.0 * t7) + 0.5)
        k0 = np.floor(((s + t0 - 7.0 * t7) * 0.5) + 0.5)
        k7 = np.floor(2.0 * t7 + 0.5)
        c0 = k0 - qf * np.floor(k0 / qf)
        c1 = k1 - qf * np.floor(k1 / qf)
        c2 = k2 - qf * np.floor(k2 / qf)
        c3 = k3 - qf * np.floor(k3 / qf)
        c4 = k4 - qf * np.floor(k4 / qf)
        c5 = k5 - qf * np.floor(k5 / qf)
        c6 = k6 - qf * np.floor(k6 / qf)
        c7 = k7 - qf * np.floor(k7 / qf)
        OUT[w] = c0
        OUT[1 * LANES + w] = c1
        OUT[2 * LANES + w] = c2
        OUT[3 * LANES + w] = c3
        OUT[4 * LANES + w] = c4
        OUT[5 * LANES + w] = c5
        OUT[6 * LANES + w] = c6
        OUT[7 * LANES + w] = c7
        if not full:
            continue
        h = 0.5 * c7
        y0 = (2.0 * c0 - c1) + h
        y1 = (c1 - c2) + h
        y2 = (c2 - c3) + h
        y3 = (c3 - c4) + h
        y4 = (c4 - c5) + h
        y5 = (c5 - c6) + h
        y6 = c6 + h
        y7 = h
        v0 = y0 / qf
        v1 = y1 / qf
        v2 = y2 / qf
        v3 = y3 / qf
        v4 = y4 / qf
        v5 = y5 / qf
        v6 = y6 / qf
        v7 = y7 / qf
        u00 = v0 - 0.0
        f00 = np.floor(u00 + 0.5)
        u01 = v1 - 0.0
        f01 = np.floor(u01 + 0.5)
        u02 = v2 - 0.0
        f02 = np.floor(u02 + 0.5)
        u03 = v3 - 0.0
        f03 = np.floor(u03 + 0.5)
        u04 = v4 - 0.0
        f04 = np.floor(u04 + 0.5)
        u05 = v5 - 0.0
        f05 = np.floor(u05 + 0.5)
        u06 = v6 - 0.0
        f06 = np.floor(u06 + 0.5)
        u07 = v7 - 0.0
        f07 = np.floor(u07 + 0.5)
        par = f00 + f01 + f02 + f03 + f04 + f05 + f06 + f07
        we = -1.0
        wj = 0.0
        wu = 0.0
        wf = 0.0
        e = abs(u00 - f00)
        b = e > we
        we = e if b else we
        wj = 0.0 if b else wj
        wu = u00 if b else wu
        wf = f00 if b else wf
        e = abs(u01 - f01)
        b = e > we
        we = e if b else we
        wj = 1.0 if b else wj
        wu = u01 if b else wu
        wf = f01 if b else wf
        e = abs(u02 - f02)
        b = e > we
        we = e if b else we
        wj = 2.0 if b else wj
        wu = u02 if b else wu
        wf = f02 if b else wf
        e = abs(u03 - f03)
        b = e > we
        we = e if b else we
        wj = 3.0 if b else wj
        wu = u03 if b else wu
        wf = f03 if b else wf
        e = abs(u04 - f04)
        b = e > we
        we = e if b else we
        wj = 4.0 if b else wj
        wu = u04 if b else wu
        wf = f04 if b else wf
        e = abs(u05 - f05)
        b = e > we
        we = e if b else we
        wj = 5.0 if b else wj
        wu = u05 if b else wu
        wf = f05 if b else wf
        e = abs(u06 - f06)
        b = e > we
        we = e if b else we
        wj = 6.0 if b else wj
        wu = u06 if b else wu
        wf = f06 if b else wf
        e = abs(u07 - f07)
        b = e > we
        we = e if b else we
        wj = 7.0 if b else wj
        wu = u07 if b else wu
        wf = f07 if b else wf
        fix = (par - 2.0 * np.floor(par * 0.5)) * (1.0 if wu >= wf else -1.0)
        d0 = 0.0
        o00 = (f00 + fix if wj == 0.0 else f00) + 0.0
        e = v0 - o00
        d0 += e * e
        o01 = (f01 + fix if wj == 1.0 else f01) + 0.0
        e = v1 - o01
        d0 += e * e
        o02 = (f02 + fix if wj == 2.0 else f02) + 0.0
        e = v2 - o02
        d0 += e * e
        o03 = (f03 + fix if wj == 3.0 else f03) + 0.0
        e = v3 - o03
        d0 += e * e
        o04 = (f04 + fix if wj == 4.0 else f04) + 0.0
        e = v4 - o04
        d0 += e * e
        o05 = (f05 + fix if wj == 5.0 else f05) + 0.0
        e = v5 - o05
        d0 += e * e
        o06 = (f06 + fix if wj == 6.0 else f06) + 0.0
        e = v6 - o06
        d0 += e * e
        o07 = (f07 + fix if wj == 7.0 else f07) + 0.0
        e = v7 - o07
        d0 += e * e
        u10 = v0 - 0.5
        f10 = np.floor(u10 + 0.5)
        u11 = v1 - 0.5
        f11 = np.floor(u11 + 0.5)
        u12 = v2 - 0.5
        f12 = np.floor(u12 + 0.5)
        u13 = v3 - 0.5
        f13 = np.floor(u13 + 0.5)
        u14 = v4 - 0.5
        f14 = np.floor(u14 + 0.5)
        u15 = v5 - 0.5
        f15 = np.floor(u15 + 0.5)
        u16 = v6 - 0.5
        f16 = np.floor(u16 + 0.5)
        u17 = v7 - 0.5
        f17 = np.floor(u17 + 0.5)
        par = f10 + f11 + f12 + f13 + f14 + f15 + f16 + f17
        we = -1.0
        wj = 0.0
        wu = 0.0
        wf = 0.0
        e = abs(u10 - f10)
        b = e > we
        we = e if b else we
        wj = 0.0 if b else wj
        wu = u10 if b else wu
        wf = f10 if b else wf
        e = abs(u11 - f11)
        b = e > we
        we = e if b else we
        wj = 1.0 if b else wj
        wu = u11 if b else wu
        wf = f11 if b else wf
        e = abs(u12 - f12)
        b = e > we
        we = e if b else we
        wj = 2.0 if b else wj
        wu = u12 if b else wu
        wf = f12 if b else wf
        e = abs(u13 - f13)
        b = e > we
        we = e if b else we
        wj = 3.0 if b else wj
        wu = u13 if b else wu
        wf = f13 if b else wf
        e = abs(u14 - f14)
        b = e > we
        we = e if b else we
        wj = 4.0 if b else wj
        wu = u14 if b else wu
        wf = f14 if b else wf
        e = abs(u15 - f15)
        b = e > we
        we = e if b else we
        wj = 5.0 if b else wj
        wu = u15 if b else wu
        wf = f15 if b else wf
        e = abs(u16 - f16)
        b = e > we
        we = e if b else we
        wj = 6.0 if b else wj
        wu = u16 if b else wu
        wf = f16 if b else wf
        e = abs(u17 - f17)
        b = e > we
        we = e if b else we
        wj = 7.0 if b else wj
        wu = u17 if b else wu
        wf = f17 if b else wf
        fix = (par - 2.0 * np.floor(par * 0.5)) * (1.0 if wu >= wf else -1.0)
        d1 = 0.0
        o10 = (f10 + fix if wj == 0.0 else f10) + 0.5
        e = v0 - o10
        d1 += e * e
        o11 = (f11 + fix if wj == 1.0 else f11) + 0.5
        e = v1 - o11
        d1 += e * e
        o12 = (f12 + fix if wj == 2.0 else f12) + 0.5
        e = v2 - o12
        d1 += e * e
        o13 = (f13 + fix if wj == 3.0 else f13) + 0.5
        e = v3 - o13
        d1 += e * e
        o14 = (f14 + fix if wj == 4.0 else f14) + 0.5
        e = v4 - o14
        d1 += e * e
        o15 = (f15 + fix if wj == 5.0 else f15) + 0.5
        e = v5 - o15
        d1 += e * e
        o16 = (f16 + fix if wj == 6.0 else f16) + 0.5
        e = v6 - o16
        d1 += e * e
        o17 = (f17 + fix if wj == 7.0 else f17) + 0.5
        e = v7 - o17
        d1 += e * e
        pick = d1 < d0
        p0 = o10 if pick else o00
        p1 = o11 if pick else o01
        p2 = o12 if pick else o02
        p3 = o13 if pick else o03
        p4 = o14 if pick else o04
        p5 = o15 if pick else o05
        p6 = o16 if pick else o06
        p7 = o17 if pick else o07
        s = 0.0
        s += p6
        m6 = np.floor((s - 1.0 * p7) + 0.5)
        s += p5
        m5 = np.floor((s - 2.0 * p7) + 0.5)
        s += p4
        m4 = np.floor((s - 3.0 * p7) + 0.5)
        s += p3
        m3 = np.floor((s - 4.0 * p7) + 0.5)
        s += p2
        m2 = np.floor((s - 5.0 * p7) + 0.5)
        s += p1
        m1 = np.floor((s - 6.0 * p7) + 0.5)
        m0 = np.floor(((s + p0 - 7.0 * p7) * 0.5) + 0.5)
        m7 = np.floor(2.0 * p7 + 0.5)
        bad = 0.0
        bad += 1.0 if m0 * qf != c0 - k0 else 0.0
        bad += 1.0 if m1 * qf != c1 - k1 else 0.0
        bad += 1.0 if m2 * qf != c2 - k2 else 0.0
        bad += 1.0 if m3 * qf != c3 - k3 else 0.0
        bad += 1.0 if m4 * qf != c4 - k4 else 0.0
        bad += 1.0 if m5 * qf != c5 - k5 else 0.0
        bad += 1.0 if m6 * qf != c6 - k6 else 0.0
        bad += 1.0 if m7 * qf != c7 - k7 else 0.0
        OUT[8 * LANES + w] = bad


@njit(cache=True, error_model="numpy")
def _first_step(row, fs, nw, q, CAND, GB, T):
    """One scale (index ``fs``, its lanes ``row``: see :func:`_scale_lanes`)
    of the search, per lane, for the first candidate in the order (error,
    index) with ``max <t, r> <= q``: when this scale precedes the one in
    ``CAND`` (-1.0: none yet; error ``GB``), it replaces it, and its fine
    point replaces ``T``'s. Scales are visited in increasing index, so the
    strict comparison keeps the lowest index among equal errors."""
    for w in range(nw):
        g = row[8 * LANES + w]
        take = (row[9 * LANES + w] <= q) & (g < GB[w])
        CAND[w] = fs if take else CAND[w]
        GB[w] = g if take else GB[w]
        for j in range(8):
            T[j * LANES + w] = row[j * LANES + w] if take else T[j * LANES + w]


@njit(cache=True, parallel=True, error_model="numpy")
def e8_points_rows(x, inv_beta, z, out2):
    """:func:`e8_points_rows_scalar`, ``LANES`` blocks at a time: the same
    bits. The points ``v = x * inv_beta + z`` are formed as the scalar path
    forms them and handed to :func:`_scale_lanes` with scale 1 and no
    dither (``v / 1 + 0`` is ``v``, but for the sign of a zero, which the
    nearest point does not see); runs of blocks with an input beyond
    ``LANE_LIMIT`` (or not finite) go through the scalar decoder."""
    m = x.shape[0]
    zm = z.shape[0]
    nchunks = (m + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        XZ = np.zeros(16 * LANES)
        OUT = np.empty(10 * LANES)
        v = np.empty(8)
        t = np.empty(8)
        tmp = np.empty(8)
        c1 = min(m, (c + 1) * CHUNK)
        for i0 in range(c * CHUNK, c1, LANES):
            nw = min(LANES, c1 - i0)
            small = True
            for lane in range(nw):
                iz = i0 + lane if zm > 1 else 0
                for j in range(8):
                    vj = x[i0 + lane, j] * inv_beta + z[iz, j]
                    small &= abs(vj) <= LANE_LIMIT      # False for NaN
                    XZ[j * LANES + lane] = vj
            if small:
                _scale_lanes(XZ, 1.0, nw, OUT, False)
                for lane in range(nw):
                    for j in range(8):
                        out2[i0 + lane, j] = np.int32(2.0 * OUT[j * LANES + lane])
                continue
            for lane in range(nw):
                _point_block(x, i0 + lane, inv_beta, z, v, t, tmp, out2)


@njit(cache=True, parallel=True)
def scaled_points_rows(points, beta, z, out):
    """``out[i, b] = beta * (0.5 * points[i, b] - z)`` (the decoder's raw
    blocks of the variable mode: ``points`` (r, keep, 8) int32 are twice the
    E8 points, ``z`` their dither, (r, keep, 8) or one block (1, 1, 8)) for
    blocks ``b < keep`` of ``out`` (r, B, 8), 0 after them; each step
    rounded as numpy rounds it."""
    r, keep = points.shape[0], points.shape[1]
    B = out.shape[1]
    per_block = z.shape[0] > 1 or z.shape[1] > 1
    for i in prange(r):
        for b in range(keep):
            for j in range(8):
                zz = z[i, b, j] if per_block else z[0, 0, j]
                out[i, b, j] = beta * (0.5 * np.float64(points[i, b, j]) - zz)
        for b in range(keep, B):
            for j in range(8):
                out[i, b, j] = 0.0


@njit(cache=True, parallel=True, error_model="numpy")
def encode_multiscale_rows(x, q, betas, z, codes, index, sqerr, dec):
    """Voronoi-encode rows of ``x`` (m, 8) with the E8 code at the scales
    ``betas`` and keep, per row, the scale with the smallest granular error
    ``||beta (Q(x / beta + z) - z) - x||^2`` among those without overload
    (lowest index among equals); when every scale overloads, the scale whose
    actual decoded output is nearest.

    The fine points are cheap and the overload test is not, so candidates
    are tested for overload in order of increasing error and the first one
    without overload is kept. Writes ``codes`` (m, 8), ``index`` (m,) and
    ``sqerr`` (m,), the squared error of the kept reconstruction, and, when
    ``dec`` has m rows (pass shape (0, 8) to skip it), the reconstruction
    itself: the same bits as :func:`decode_multiscale_rows` (without
    overload the decoder's ``y - q Q(y / q)`` is exactly the fine point).

    Every scale's fine point, error and facet bound ``max <t, r>`` (see
    :func:`_wrap_e8_fast`) are computed for ``LANES`` blocks at once
    (:func:`_scale_lanes`). In the order (error, index) the candidates
    outside ``q V`` (bound ``> q``) overload and are skipped; the first one
    left (:func:`_first_step`) is kept when it is inside (``< q``) or, on
    the boundary (``= q``), when the full overload test (:func:`_wrap_lanes`,
    run at once on the boundary lanes gathered side by side) passes it.
    When it fails, the next candidate is
    the least error inside ``q V`` unless another boundary one comes first;
    that case, blocks with no candidate left and inputs too large for the
    lanes go through :func:`_encode_block`, as every block does in
    :func:`encode_multiscale_rows_scalar`. The same bits as that kernel.
    """
    m = x.shape[0]
    want_dec, bmin, zmax = _chunk_setup(x, betas, z, dec)
    nchunks = (m + CHUNK - 1) // CHUNK
    if serial(nchunks):
        for c in range(nchunks):
            _encode_chunk(x, c, q, betas, z, codes, index, sqerr, dec,
                          want_dec, bmin, zmax)
    else:
        for c in prange(nchunks):
            _encode_chunk(x, c, q, betas, z, codes, index, sqerr, dec,
                          want_dec, bmin, zmax)


@njit(cache=True)
def _chunk_setup(x, betas, z, dec):
    """``(want_dec, bmin, zmax)`` of :func:`_encode_chunk` for the rows
    ``x``: whether ``dec`` (0 rows or as many as ``x``, else ValueError) is
    wanted, the least ``|beta|``, the largest ``|z|``."""
    if dec.shape[0] != 0 and dec.shape[0] != x.shape[0]:
        raise ValueError("dec must have 0 or as many rows as x")
    bmin = np.inf
    for s in range(betas.shape[0]):
        bmin = min(bmin, abs(betas[s]))
    zmax = 0.0
    for i in range(z.shape[0]):
        for j in range(8):
            zmax = max(zmax, abs(z[i, j]))
    return dec.shape[0] > 0, bmin, zmax


@njit(cache=True, error_model="numpy")
def _encode_chunk(x, c, q, betas, z, codes, index, sqerr, dec, want_dec, bmin,
                  zmax):
    """Chunk ``c`` (rows ``c CHUNK`` to ``(c + 1) CHUNK``) of
    :func:`encode_multiscale_rows`, with its scratch; ``bmin`` the least
    ``|beta|``, ``zmax`` the largest ``|z|``."""
    m = x.shape[0]
    k = betas.shape[0]
    zm = z.shape[0]
    v, T, g, done, t, w8, tmp, u, y, r, crow, kk, uk = _block_scratch(k)
    # the lanes' arrays, views of one allocation
    buf = np.empty((51 + 10 * k) * LANES)
    XZ = buf[:16 * LANES]
    CAND = buf[16 * LANES:17 * LANES]
    GB = buf[17 * LANES:18 * LANES]
    TC = buf[18 * LANES:26 * LANES]
    WR = buf[26 * LANES:34 * LANES]
    TB = buf[34 * LANES:42 * LANES]
    WB = buf[42 * LANES:51 * LANES]
    OUT = buf[51 * LANES:].reshape(k, 10 * LANES)
    TC[:] = 0.0
    POS = np.empty(LANES, np.int64)
    # a zero dither (all of it: zmax is 0) is left out of the search: the
    # same bits (``x / beta + 0`` and ``x / beta`` differ only in the sign
    # of a zero, which the nearest point does not see)
    dither = zmax > 0.0
    c1 = min(m, (c + 1) * CHUNK)
    for i0 in range(c * CHUNK, c1, LANES):
        nw = min(LANES, c1 - i0)
        # the vector steps run on a multiple of 8 lanes (whole SIMD
        # vectors, not the scalar loop of a remainder), the lanes past nw
        # on zeros; lanes are independent, and those are not read
        nv = min(LANES, (nw + 7) // 8 * 8)
        xmax = 0.0
        for lane in range(nw):
            for j in range(8):
                xmax = max(xmax, abs(x[i0 + lane, j]))
                XZ[j * LANES + lane] = x[i0 + lane, j]
        if dither:
            for lane in range(nw):
                iz = i0 + lane if zm > 1 else 0
                for j in range(8):
                    XZ[(8 + j) * LANES + lane] = z[iz, j]
        for lane in range(nw, nv):
            for j in range(16):
                XZ[j * LANES + lane] = 0.0
        vector = xmax / bmin + zmax <= LANE_LIMIT      # False for NaN
        if vector:
            for s in range(k):
                _scale_lanes(XZ, betas[s], nv, OUT[s], dither)
        if vector:
            for w in range(nv):
                CAND[w] = -1.0
                GB[w] = np.inf
            for s in range(k):
                _first_step(OUT[s], np.float64(s), nv, q, CAND, GB, TC)
            # the codes of every lane's candidate; the full overload test
            # only for the candidates on the boundary of q V (often a
            # quarter of the lanes), gathered side by side
            _wrap_lanes(TC, nv, q, WR, False)
            nb = 0
            for w in range(nw):
                c0 = np.int64(CAND[w])
                if c0 >= 0 and OUT[c0, 9 * LANES + w] == q:
                    for j in range(8):
                        TB[j * LANES + nb] = TC[j * LANES + w]
                    POS[w] = nb
                    nb += 1
            if nb > 0:
                nbv = min(LANES, (nb + 7) // 8 * 8)
                for w in range(nb, nbv):
                    for j in range(8):
                        TB[j * LANES + w] = 0.0
                _wrap_lanes(TB, nbv, q, WB, True)
        for lane in range(nw):
            i = i0 + lane
            iz = i if zm > 1 else 0
            found = -1
            codes_from = 0           # 1: WR (vector), 2: crow (scalar)
            if vector and CAND[lane] >= 0.0:
                c0 = np.int64(CAND[lane])
                if (OUT[c0, 9 * LANES + lane] < q
                        or WB[8 * LANES + POS[lane]] == 0.0):
                    # inside q V, or on its boundary without overload
                    found = c0
                    codes_from = 1
                else:
                    # on the boundary and overloading: the next candidate
                    # is the least error inside q V, unless another
                    # boundary one comes first (then the scalar path)
                    for s in range(k):
                        gs = OUT[s, 8 * LANES + lane]
                        if OUT[s, 9 * LANES + lane] < q and (
                                found < 0 or gs < OUT[found, 8 * LANES + lane]):
                            found = s
                    if found >= 0:
                        gb = OUT[found, 8 * LANES + lane]
                        for s in range(k):
                            gs = OUT[s, 8 * LANES + lane]
                            if s != c0 and OUT[s, 9 * LANES + lane] == q and (
                                    gs < gb or (gs == gb and s < found)):
                                found = -1
                                break
                    if found >= 0:
                        for j in range(8):
                            t[j] = OUT[found, j * LANES + lane]
                        e8_coordinates(t, kk)
                        for j in range(8):
                            crow[j] = np.int64(mod_floor(kk[j], q))
                        codes_from = 2
            if found < 0:     # every scale overloads, or huge inputs
                _encode_block(x, i, q, betas, z, iz, want_dec, codes, index,
                              sqerr, dec, v, T, g, done, t, w8, tmp, u, y, r,
                              crow, kk, uk)
                continue
            if codes_from == 1:
                for j in range(8):
                    codes[i, j] = np.int64(WR[j * LANES + lane])
            else:
                for j in range(8):
                    codes[i, j] = crow[j]
            index[i] = found
            sqerr[i] = OUT[found, 8 * LANES + lane]
            if want_dec:
                beta = betas[found]
                for j in range(8):
                    dec[i, j] = beta * (OUT[found, j * LANES + lane]
                                        - z[iz, j])


@njit(cache=True, parallel=True)
def decode_multiscale_rows(codes, index, q, betas, z, out):
    """Decode rows encoded by :func:`encode_multiscale_rows`."""
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
            decode_e8_into(crow, q, betas[index[i]], z[iz], r, y, w, tmp)
            for j in range(8):
                out[i, j] = r[j]


@njit(cache=True)
def pack_words(words, nbits, out):
    """Write the low ``nbits`` (1..64) of each uint64 in ``words`` into the byte
    array ``out``, little-endian bit order, densely (word i starts at bit
    ``i * nbits``). ``out`` must hold ``ceil(len(words) * nbits / 8)`` zeroed
    bytes (they are OR-ed in). The bits gather in a 64-bit accumulator that
    is written out 8 bytes at a time."""
    full = np.uint64(0xFFFFFFFFFFFFFFFF)
    mask = full if nbits == 64 else (np.uint64(1) << np.uint64(nbits)) - np.uint64(1)
    acc = np.uint64(0)
    have = 0                    # bits held in acc (0..63)
    pos = 0                     # next byte of out
    for i in range(words.shape[0]):
        w = words[i] & mask
        acc |= w << np.uint64(have)
        if have + nbits >= 64:
            for b in range(8):
                out[pos + b] |= np.uint8((acc >> np.uint64(8 * b)) & np.uint64(255))
            pos += 8
            # the bits of w that did not fit
            acc = w >> np.uint64(64 - have) if have > 0 else np.uint64(0)
            have += nbits - 64
        else:
            have += nbits
    for b in range((have + 7) // 8):
        out[pos + b] |= np.uint8((acc >> np.uint64(8 * b)) & np.uint64(255))


@njit(cache=True)
def unpack_words(data, nbits, count, out):
    """Inverse of :func:`pack_words`: read ``count`` words of ``nbits`` bits."""
    pos = 0
    for i in range(count):
        w = np.uint64(0)
        got = 0
        while got < nbits:
            byte = pos >> 3
            off = pos & 7
            take = min(8 - off, nbits - got)
            bits = (np.uint64(data[byte]) >> np.uint64(off)) & (
                (np.uint64(1) << np.uint64(take)) - np.uint64(1))
            w |= bits << np.uint64(got)
            got += take
            pos += take
        out[i] = w


@njit(cache=True, parallel=True)
def mixed_radix_words(codes, index, q, out):
    """``out[i] = index[i] * q^8 + sum_j codes[i, j] q^j`` (uint64)."""
    m = codes.shape[0]
    for i in prange(m):
        w = np.uint64(index[i])
        for j in range(7, -1, -1):
            w = w * np.uint64(q) + np.uint64(codes[i, j])
        out[i] = w


@njit(cache=True, parallel=True)
def split_mixed_radix(words, q, codes, index):
    """Inverse of :func:`mixed_radix_words`."""
    m = words.shape[0]
    for i in prange(m):
        w = words[i]
        for j in range(8):
            codes[i, j] = w % np.uint64(q)
            w = w // np.uint64(q)
        index[i] = w


@njit(cache=True)
def e8_max_abs_u(T2):
    """``max |u|`` over doubled E8 points (``u = (2t - coset) / 2``)."""
    m = T2.shape[0]
    best = 0
    for i in range(m):
        c = T2[i, 0] & 1
        for j in range(8):
            u = (T2[i, j] - c) >> 1
            a = -u if u < 0 else u
            if a > best:
                best = a
    return best


@njit(cache=True)
def e8_symbol_stats(T2, K, h_main, h_last, coset_count, sumsq):
    """Histograms of the E8 symbol streams (see ``nqlib.quantizers.entropy``).

    ``h_main[c, u + K]`` counts ``u_0..u_6`` of blocks in coset ``c``;
    ``h_last[c, p, w - w_lo(p)]`` counts ``w = (u_7 - p) // 2`` with
    ``w_lo(p) = (-K - p) // 2``; ``coset_count[c]`` and ``sumsq[c]``
    (sum of ``t^2`` over the 8 coordinates) per coset. Arrays are zeroed here.
    """
    h_main[:] = 0
    h_last[:] = 0
    coset_count[:] = 0
    sumsq[:] = 0.0
    m = T2.shape[0]
    for i in range(m):
        c = T2[i, 0] & 1
        coset_count[c] += 1
        par = 0
        for j in range(8):
            t = 0.5 * T2[i, j]
            sumsq[c] += t * t
        for j in range(7):
            u = (T2[i, j] - c) >> 1
            par += u
            h_main[c, u + K] += 1
        p = par & 1
        u7 = (T2[i, 7] - c) >> 1
        w = (u7 - p) >> 1
        h_last[c, p, w - ((-K - p) >> 1)] += 1


@njit(cache=True)
def e8_stream_symbols(T2, stream, coset, parity, offset, out):
    """The symbols of one stream of the E8 entropy code (see
    ``nqlib.quantizers.entropy``) for doubled points ``T2`` (m, 8), in block
    order, written to ``out`` (int32, at least ``7 m`` long); returns how
    many. With ``c`` a block's coset bit and ``u = (2t - c) / 2``:

    * ``stream == 0``: ``c`` of every block;
    * ``stream == 1``: ``u_0 + offset, .., u_6 + offset`` of the blocks with
      ``c == coset``;
    * ``stream == 2``: ``(u_7 - p) // 2 - offset`` of the blocks with
      ``c == coset`` whose ``p = (u_0 + .. + u_6) mod 2`` equals ``parity``.

    The same integers, in the same order, as ``entropy.e8_split`` and the
    selections of ``e8_encode`` (one pass, no temporaries).
    """
    m = T2.shape[0]
    k = 0
    for i in range(m):
        c = np.int64(T2[i, 0]) & 1
        if stream == 0:
            out[k] = c
            k += 1
            continue
        if c != coset:
            continue
        if stream == 1:
            for j in range(7):
                out[k] = ((np.int64(T2[i, j]) - c) >> 1) + offset
                k += 1
            continue
        par = np.int64(0)
        for j in range(7):
            par += (np.int64(T2[i, j]) - c) >> 1
        if (par & 1) != parity:
            continue
        u7 = (np.int64(T2[i, 7]) - c) >> 1
        out[k] = ((u7 - parity) >> 1) - offset
        k += 1
    return k


@njit(cache=True)
def encode_pack_rows(x, q, betas, z, nbits, out, dec):
    """:func:`encode_multiscale_rows`, :func:`mixed_radix_words` and
    :func:`pack_words` in one call: the ``nbits``-bit words of the rows of
    ``x`` OR-ed into the zeroed bytes ``out``; ``dec`` as in
    :func:`encode_multiscale_rows`."""
    m = x.shape[0]
    encode_pack_into(x, q, betas, z, nbits, out, dec,
                     np.empty((m, 8), dtype=np.int64), np.empty(m, dtype=np.int64),
                     np.empty(m), np.empty(m, dtype=np.uint64))


@njit(cache=True)
def encode_pack_into(x, q, betas, z, nbits, out, dec, codes, index, sqerr,
                     words):
    """:func:`encode_pack_rows` with its scratch given: ``codes`` (m, 8),
    ``index`` (m,), ``sqerr`` (m,), ``words`` (m,) uint64, for the ``m``
    rows of ``x`` (at least as long: only their first ``m`` entries are
    used)."""
    m = x.shape[0]
    encode_multiscale_rows(x, q, betas, z, codes[:m], index[:m], sqerr[:m], dec)
    _pack_codes(codes, index, q, m, nbits, words, out)


@njit(cache=True)
def encode_pack_serial(x, q, betas, z, nbits, out, dec, codes, index, sqerr,
                       words):
    """:func:`encode_pack_into` in the calling thread (the encoder's chunks
    one after the other: the same bits), for callers that split their own
    work over threads."""
    m = x.shape[0]
    want_dec, bmin, zmax = _chunk_setup(x, betas, z, dec)
    for c in range((m + CHUNK - 1) // CHUNK):
        _encode_chunk(x, c, q, betas, z, codes, index, sqerr, dec, want_dec,
                      bmin, zmax)
    _pack_codes(codes, index, q, m, nbits, words, out)


@njit(cache=True)
def _pack_codes(codes, index, q, m, nbits, words, out):
    """The words ``index q^8 + sum_j codes[i, j] q^j`` of the first ``m``
    rows (:func:`mixed_radix_words`' order) into ``words``, packed into
    ``out`` (:func:`pack_words`)."""
    for i in range(m):
        w = np.uint64(index[i])
        for j in range(7, -1, -1):
            w = w * np.uint64(q) + np.uint64(codes[i, j])
        words[i] = w
    pack_words(words[:m], nbits, out)


# serialised when numba's threading layer is not thread-safe; the driver
# runs a parallel kernel inside, so it is serialised too
guard_module(globals())
if not threadsafe():
    encode_pack_rows = guarded(encode_pack_rows)
    encode_pack_into = guarded(encode_pack_into)
