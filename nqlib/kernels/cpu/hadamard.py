"""Numba fast Walsh--Hadamard transform over rows."""

from numba import njit, prange

from nqlib.kernels.cpu.guard import guard_module


@njit(cache=True, parallel=True)
def fwht_rows(x, scale):
    """In place: every row of ``x`` (m, 2^k) becomes ``scale * H x_row``.

    ``H`` is the Sylvester Hadamard matrix (entries +-1, natural order), so
    ``scale = 2^(-k/2)`` makes the transform orthonormal. Butterflies in the
    usual order; the sums are exact for dyadic data.
    """
    m, n = x.shape
    for i in prange(m):
        h = 1
        while h < n:
            for start in range(0, n, 2 * h):
                for j in range(start, start + h):
                    a = x[i, j]
                    b = x[i, j + h]
                    x[i, j] = a + b
                    x[i, j + h] = a - b
            h *= 2
        for j in range(n):
            x[i, j] *= scale


# serialised when numba's threading layer is not thread-safe
guard_module(globals())
