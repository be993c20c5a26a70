"""Numba kernels of the matrix quantizer: E8 blocks at one or several scales,
and fixed-length bit packing.

Arrays in, arrays out. Arithmetic follows :mod:`nqlib.kernels.cpu.lattice`.
"""

import numpy as np
from numba import njit, prange

from nqlib.kernels.cpu.guard import guard_module
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
def e8_points_rows(x, inv_beta, z, out2):
    """``out2 = 2 Q_E8(x * inv_beta + z)`` as integers, for rows of ``x`` (m, 8).

    ``z`` is (1, 8) or (m, 8). Twice the point is an integer vector (all even:
    the D8 coset; all odd: the D8 + 1/2 coset).
    """
    m = x.shape[0]
    zm = z.shape[0]
    nchunks = (m + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        v = np.empty(8)
        t = np.empty(8)
        tmp = np.empty(8)
        for i in range(c * CHUNK, min(m, (c + 1) * CHUNK)):
            iz = i if zm > 1 else 0
            for j in range(8):
                v[j] = x[i, j] * inv_beta + z[iz, j]
            e8_into(v, t, tmp)
            for j in range(8):
                out2[i, j] = np.int32(2.0 * t[j])


@njit(cache=True, parallel=True)
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
    """
    m = x.shape[0]
    if dec.shape[0] != 0 and dec.shape[0] != m:
        raise ValueError("dec must have 0 or as many rows as x")
    want_dec = dec.shape[0] > 0
    k = betas.shape[0]
    zm = z.shape[0]
    nchunks = (m + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        v = np.empty(8)
        T = np.empty((k, 8))
        g = np.empty(k)
        done = np.empty(k, dtype=np.bool_)
        t = np.empty(8)
        w = np.empty(8)
        tmp = np.empty(8)
        u = np.empty(8)
        y = np.empty(8)
        r = np.empty(8)
        crow = np.empty(8, dtype=np.int64)
        kk = np.empty(8, dtype=np.int64)
        uk = np.empty(8, dtype=np.int64)
        for i in range(c * CHUNK, min(m, (c + 1) * CHUNK)):
            iz = i if zm > 1 else 0
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
    bytes."""
    pos = 0
    for i in range(words.shape[0]):
        w = words[i]
        left = nbits
        while left > 0:
            byte = pos >> 3
            off = pos & 7
            take = min(8 - off, left)
            mask = (np.uint64(1) << np.uint64(take)) - np.uint64(1)
            out[byte] |= np.uint8((w & mask) << np.uint64(off))
            w = w >> np.uint64(take)
            pos += take
            left -= take


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


# serialised when numba's threading layer is not thread-safe
guard_module(globals())
