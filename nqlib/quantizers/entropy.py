"""Entropy coding of lattice points with ``constriction``'s ANS coder.

The model (the "simple model" of the book): a rotated, normalised block is
close to N(0, I_8), so the E8 point ``t = Q(x / beta)`` of a block has
coordinates that are discretised Gaussians. With ``c`` the coset bit
(``t`` in D8 or D8 + 1/2) and ``u = t - c/2`` (an integer vector with an even
sum) the description of a block is

* the coset bit, with a fitted probability;
* ``u_0 .. u_6`` given the coset, each with the discretised Gaussian
  ``P(u) ∝ exp(-(u + c/2)^2 / (2 sigma_c^2))`` on ``[-K, K]``;
* ``u_7`` given the coset and the parity of ``u_0 + ... + u_6``: the sum is
  even, so only values of that parity are possible, which saves a bit.

``sigma_0``, ``sigma_1`` (float32), ``K`` and the coset probability are the
only side information. Probability tables are quantised to integers with a
fixed rule, so encoder and decoder build bit-identical models; a CRC of the
symbols guards against a mismatch (for instance a file written by a
different version). What the decoder really reproduces is the integer
table: from format version 3 it is computed with
:func:`nqlib.quantizers.draws.exp_nonpositive` (IEEE operations only, no
libm) and scaled to its peak (no floating-point sum), so every machine
builds the same integers; the weights are then handed to ``constriction``
as ``weights / sum(weights)`` -- a sum of integers, exact -- whose
quantisation to its fixed-point model is its own deterministic arithmetic.
Version-2 files used ``np.exp`` and a floating-point normalisation
(``version=2`` arguments below).

The scalar baseline (entropy-coded uniform scalar quantization, ECSQ) uses
one discretised Gaussian for all coordinates.

Book: chapter "The practical quantizer", label ``ch-practical``.
"""

from __future__ import annotations

import zlib

import numpy as np

from nqlib.quantizers import draws

#: integer precision of the probability tables: weights are >= 1; the peak
#: weight is 2^16 (format version 3), or the weights sum to about 2^16 (2)
TABLE_BITS = 16
#: the format version whose tables the functions below build by default
VERSION = 3


def _gaussian_table(values, offset, sigma, version=VERSION):
    """Integer weights ∝ exp(-(v + offset)^2 / (2 sigma^2)) over ``values``
    (float64 holding integers).

    Version 3: ``max(1, floor(2^16 exp(l - max l) + 1/2))`` with nqlib's own
    exp, the same integers on every machine. Version 2: normalised by a
    floating-point sum first, with ``np.exp``.
    """
    v = np.asarray(values, dtype=np.float64) + offset
    s = float(np.float32(sigma))
    logw = -(v * v) / (2.0 * s * s)
    if version >= draws.FIRST_OWN_DRAWS:
        p = draws.exp_nonpositive(logw - logw.max())
    else:
        p = np.exp(logw - logw.max())
        p /= p.sum()
    return np.maximum(1.0, np.floor(p * 2.0**TABLE_BITS + 0.5))


def _bits(counts_by_value, weights):
    """Ideal code length in bits of symbols with these counts under weights."""
    p = weights / weights.sum()
    return float(-(counts_by_value * np.log2(p)).sum())


def e8_split(T2):
    """Split doubled E8 points ``T2 = 2t`` (m, 8) into the symbol streams.

    Returns ``coset (m,)``, ``u (m, 8)`` int64, ``parity (m,)`` of
    ``u_0 + .. + u_6``.
    """
    T2 = np.asarray(T2, dtype=np.int64)
    coset = T2[:, 0] & 1
    u = (T2 - coset[:, None]) >> 1
    parity = u[:, :7].sum(axis=1) & 1
    return coset, u, parity


def e8_stats(T2) -> dict:
    """Histograms of the symbol streams of doubled E8 points ``T2`` (m, 8),
    from one compiled pass: what the model fit and the ideal code length
    need."""
    from nqlib.kernels.cpu.nested import e8_max_abs_u, e8_symbol_stats

    T2 = np.ascontiguousarray(T2, dtype=np.int32)
    K = int(e8_max_abs_u(T2)) + 1
    h_main = np.zeros((2, 2 * K + 1), dtype=np.int64)
    h_last = np.zeros((2, 2, K + 2), dtype=np.int64)
    coset_count = np.zeros(2, dtype=np.int64)
    sumsq = np.zeros(2)
    e8_symbol_stats(T2, K, h_main, h_last, coset_count, sumsq)
    return dict(K=K, h_main=h_main, h_last=h_last, coset_count=coset_count,
                sumsq=sumsq)


def e8_fit(T2, stats=None):
    """Model parameters ``(sigma0, sigma1, K, p1_int)`` fitted to E8 points:
    ``sigma_c`` the RMS coordinate of the points in coset ``c`` (float32),
    ``K`` the largest ``|u|`` plus one, ``p1`` the coset-1 frequency in
    units of 2^-16."""
    st = e8_stats(T2) if stats is None else stats
    sig = []
    for c in (0, 1):
        cnt = st["coset_count"][c]
        s2 = st["sumsq"][c] / (8 * cnt) if cnt else 1.0
        sig.append(float(np.float32(max(np.sqrt(s2), 0.05))))
    m = max(1, int(st["coset_count"].sum()))
    p1 = int(np.clip(np.floor(st["coset_count"][1] / m * 65536 + 0.5), 1, 65535))
    return sig[0], sig[1], st["K"], p1


def _e8_tables(sigma0, sigma1, K, version=VERSION):
    """Integer weight tables of the model: the main table per coset over
    ``u in [-K, K]`` and, per (coset, parity), the table of the last
    coordinate over ``w`` with ``u_7 = 2 w + parity``."""
    vals = np.arange(-K, K + 1)
    main = [_gaussian_table(vals, 0.5 * c, s, version)
            for c, s in ((0, sigma0), (1, sigma1))]
    last = {}
    for c, s in ((0, sigma0), (1, sigma1)):
        for par in (0, 1):
            w = np.arange((-K - par) // 2, (K - par) // 2 + 1)
            last[c, par] = (w, _gaussian_table(2 * w + par, 0.5 * c, s, version))
    return vals, main, last


def e8_ideal_bits(T2, params=None, stats=None):
    """Ideal code length (bits) of the E8 points under the model ``params``
    (fitted to them when None), without side information. Cheap: it works on
    histograms, which is what rate control needs."""
    st = e8_stats(T2) if stats is None else stats
    sigma0, sigma1, K, p1 = params if params is not None else e8_fit(T2, st)
    if K < st["K"]:
        raise ValueError("model range K is smaller than the data's")
    vals, main, last = _e8_tables(sigma0, sigma1, K)
    n0, n1 = (int(v) for v in st["coset_count"])
    bits = -(n0 * np.log2(1 - p1 / 65536) + n1 * np.log2(p1 / 65536))
    Kd = st["K"]
    for c in (0, 1):
        h = np.zeros(2 * K + 1)
        h[K - Kd:K + Kd + 1] = st["h_main"][c]
        bits += _bits(h, main[c])
        for par in (0, 1):
            w, tab = last[c, par]
            hw = np.zeros(w.size)
            lo_d = (-Kd - par) // 2
            cnt = st["h_last"][c, par]
            nz = np.nonzero(cnt)[0]
            hw[nz + lo_d - w[0]] = cnt[nz]
            bits += _bits(hw, tab)
    return float(bits)


def _categorical(weights):
    import constriction

    return constriction.stream.model.Categorical(weights / weights.sum(),
                                                 perfect=False)


def symbols_crc(*arrays) -> int:
    """CRC32 of integer arrays (as int32 bytes), to detect a model mismatch."""
    crc = 0
    for a in arrays:
        # the array's own buffer (no bytes copy)
        crc = zlib.crc32(np.ascontiguousarray(a, dtype=np.int32), crc)
    return crc


#: blocks whose symbols :func:`e8_encode` extracts at a time (bounded memory)
ENCODE_CHUNK_BLOCKS = 1 << 17


def e8_encode(T2, params):
    """ANS-encode E8 points; returns the compressed uint32 words.

    The symbol streams are those of :func:`e8_split`; they are extracted
    ``ENCODE_CHUNK_BLOCKS`` blocks at a time by a compiled pass
    (``e8_stream_symbols``), so the memory used is a few megabytes whatever
    the size of ``T2``. ``encode_reverse`` of a sequence pushes its symbols
    last to first, so pushing the chunks last to first gives the same words
    as one call on the whole stream.
    """
    import constriction

    from nqlib.kernels.cpu.nested import e8_stream_symbols

    T2 = np.ascontiguousarray(T2, dtype=np.int32)
    sigma0, sigma1, K, p1 = params
    vals, main, last = _e8_tables(sigma0, sigma1, K)
    coder = constriction.stream.stack.AnsCoder()
    rows = ENCODE_CHUNK_BLOCKS
    starts = range((T2.shape[0] - 1) // rows * rows, -1, -rows)
    buf = np.empty(7 * min(rows, T2.shape[0]), dtype=np.int32)

    def push(stream, c, par, offset, weights):
        model = _categorical(weights)
        for s in starts:  # last chunk first: the coder is a stack
            count = e8_stream_symbols(T2[s:s + rows], stream, c, par, offset, buf)
            if count:
                coder.encode_reverse(buf[:count], model)

    # The decoder reads: coset bits, main symbols (coset 0 then 1), last
    # symbols per (coset, parity). A stack is last-in first-out, so encode
    # in the reverse order.
    for c in (1, 0):
        for par in (1, 0):
            w, tab = last[c, par]
            push(2, c, par, int(w[0]), tab)
    for c in (1, 0):
        push(1, c, 0, int(K), main[c])
    push(0, 0, 0, 0, np.array([65536.0 - p1, float(p1)]))
    return coder.get_compressed()


def e8_decode(words, m, params, version=VERSION):
    """Inverse of :func:`e8_encode`: the doubled points ``2t`` (m, 8) int64
    (``version``: the format version of the tables the words were coded
    with)."""
    import constriction

    sigma0, sigma1, K, p1 = params
    vals, main, last = _e8_tables(sigma0, sigma1, K, version)
    coder = constriction.stream.stack.AnsCoder(np.asarray(words, dtype=np.uint32))
    coset = coder.decode(_categorical(np.array([65536.0 - p1, float(p1)])), m)
    coset = np.asarray(coset, dtype=np.int64)
    u = np.empty((m, 8), dtype=np.int64)
    for c in (0, 1):
        sel = coset == c
        cnt = int(sel.sum())
        if cnt:
            sym = np.asarray(coder.decode(_categorical(main[c]), 7 * cnt))
            u[sel, :7] = sym.reshape(cnt, 7) - K
    parity = u[:, :7].sum(axis=1) & 1
    for c in (0, 1):
        for par in (0, 1):
            w, tab = last[c, par]
            s = (coset == c) & (parity == par)
            cnt = int(s.sum())
            if cnt:
                sym = np.asarray(coder.decode(_categorical(tab), cnt))
                u[s, 7] = 2 * (sym + w[0]) + par
    return 2 * u + coset[:, None]


# --------------------------------------------------------------- scalar ECSQ
def scalar_fit(U):
    """``(sigma, K)`` of integer scalar symbols."""
    U = np.asarray(U, dtype=np.int64)
    s2 = float((U * U).mean()) if U.size else 1.0
    return float(np.float32(max(np.sqrt(s2), 0.05))), int(np.abs(U).max()) + 1


def scalar_ideal_bits(U, params=None):
    """Ideal code length (bits) of the integer symbols ``U`` under the
    discretised-Gaussian model ``params = (sigma, K)`` (fitted when None)."""
    U = np.asarray(U, dtype=np.int64).ravel()
    sigma, K = params if params is not None else scalar_fit(U)
    tab = _gaussian_table(np.arange(-K, K + 1), 0.0, sigma)
    return _bits(np.bincount(U + K, minlength=2 * K + 1), tab)


def scalar_encode(U, params):
    """rANS stream (uint32 words) of the integer symbols ``U`` under the model
    ``params = (sigma, K)`` (:func:`scalar_decode` inverts it)."""
    import constriction

    sigma, K = params
    tab = _gaussian_table(np.arange(-K, K + 1), 0.0, sigma)
    coder = constriction.stream.stack.AnsCoder()
    sym = (np.asarray(U, dtype=np.int64).ravel() + K).astype(np.int32)
    if sym.size:
        coder.encode_reverse(sym, _categorical(tab))
    return coder.get_compressed()


def scalar_decode(words, count, params, version=VERSION):
    """Inverse of :func:`scalar_encode` (``version``: as in
    :func:`e8_decode`)."""
    import constriction

    sigma, K = params
    tab = _gaussian_table(np.arange(-K, K + 1), 0.0, sigma, version)
    coder = constriction.stream.stack.AnsCoder(np.asarray(words, dtype=np.uint32))
    return np.asarray(coder.decode(_categorical(tab), count), dtype=np.int64) - K
