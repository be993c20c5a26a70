"""Numba fast Walsh--Hadamard transform over rows."""

from numba import njit, prange

from nqlib.kernels.cpu.guard import guard_module


@njit(cache=True)
def _fwht_row(r, scale):
    """In place, ``r = scale * H r`` (length ``n = 2^k``): the butterflies of
    spans 1, 2 and 4 on each run of 8 in registers, stage after stage within
    the run (the same butterflies on the same values as stage after stage
    over the whole row, hence the same bits), then the longer spans. A
    function of its own, not inlined into the parallel loop, so that LLVM
    vectorises its loops."""
    n = r.shape[0]
    h = 1
    if n >= 8:
        for s0 in range(0, n, 8):
            a0 = r[s0]
            a1 = r[s0 + 1]
            a2 = r[s0 + 2]
            a3 = r[s0 + 3]
            a4 = r[s0 + 4]
            a5 = r[s0 + 5]
            a6 = r[s0 + 6]
            a7 = r[s0 + 7]
            b0, b1, b2, b3 = a0 + a1, a0 - a1, a2 + a3, a2 - a3
            b4, b5, b6, b7 = a4 + a5, a4 - a5, a6 + a7, a6 - a7
            c0, c1, c2, c3 = b0 + b2, b1 + b3, b0 - b2, b1 - b3
            c4, c5, c6, c7 = b4 + b6, b5 + b7, b4 - b6, b5 - b7
            r[s0] = c0 + c4
            r[s0 + 1] = c1 + c5
            r[s0 + 2] = c2 + c6
            r[s0 + 3] = c3 + c7
            r[s0 + 4] = c0 - c4
            r[s0 + 5] = c1 - c5
            r[s0 + 6] = c2 - c6
            r[s0 + 7] = c3 - c7
        h = 8
    while h < n:
        for start in range(0, n, 2 * h):
            for j in range(start, start + h):
                a = r[j]
                b = r[j + h]
                r[j] = a + b
                r[j + h] = a - b
        h *= 2
    for j in range(n):
        r[j] *= scale


@njit(cache=True, parallel=True)
def fwht_rows(x, scale):
    """In place: every row of ``x`` (m, 2^k) becomes ``scale * H x_row``.

    ``H`` is the Sylvester Hadamard matrix (entries +-1, natural order), so
    ``scale = 2^(-k/2)`` makes the transform orthonormal. Butterflies in the
    usual order (:func:`_fwht_row`); the sums are exact for dyadic data.
    """
    for i in prange(x.shape[0]):
        _fwht_row(x[i], scale)


# serialised when numba's threading layer is not thread-safe
guard_module(globals())
