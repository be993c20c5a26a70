"""Small dense linear algebra in a fixed order of operations (numba).

What a decoder computes must not depend on which BLAS or LAPACK is
installed, nor on the CPU's vector width: these loops add in a documented
order and use no ``fastmath`` (LLVM then neither reassociates nor fuses
multiply-adds), so their results are the same bits on every machine.
"""

import numpy as np
from numba import njit, prange

from nqlib.kernels.cpu.guard import guard_module


@njit(cache=True)
def orthonormalize_columns(Z, out):
    """``out`` (m, m) = the orthogonal factor ``Q`` of ``Z = Q R`` with a
    positive diagonal ``R``, by classical Gram-Schmidt applied twice per
    column ("twice is enough": orthogonal to working precision).

    Column ``k``: ``r = Q[:, :k]^T v`` (each ``r_j`` summed over rows in
    increasing order), ``v -= Q[:, :k] r`` (each ``v_i`` updated in
    increasing ``j``), twice; then ``v / sqrt(sum v_i^2)``. Returns False
    when a column is (numerically) dependent on the previous ones.
    """
    m = Z.shape[0]
    v = np.empty(m)
    r = np.empty(m)
    for k in range(m):
        for i in range(m):
            v[i] = Z[i, k]
        norm0 = 0.0
        for i in range(m):
            norm0 += v[i] * v[i]
        for _ in range(2):
            for j in range(k):
                r[j] = 0.0
            for i in range(m):
                vi = v[i]
                for j in range(k):
                    r[j] += out[i, j] * vi
            for i in range(m):
                acc = v[i]
                for j in range(k):
                    acc -= out[i, j] * r[j]
                v[i] = acc
        s = 0.0
        for i in range(m):
            s += v[i] * v[i]
        if not s > 1e-20 * norm0:
            return False
        inv = 1.0 / np.sqrt(s)
        for i in range(m):
            out[i, k] = v[i] * inv
    return True


@njit(cache=True, parallel=True)
def rows_times_matrix(X, M, out):
    """``out = X @ M`` for X (r, m), M (m, c): each entry summed over ``m``
    in increasing order (the same bits as the obvious loop)."""
    r, m = X.shape
    c = M.shape[1]
    if m == 3 and c == 3:
        # the rotation's 3 x 3 factor (lengths 3 * 2^k): the same sums,
        # written out (the loops below cost more than the arithmetic on
        # rows this short)
        for i in prange(r):
            x0, x1, x2 = X[i, 0], X[i, 1], X[i, 2]
            for j in range(3):
                out[i, j] = 0.0
                out[i, j] += x0 * M[0, j]
                out[i, j] += x1 * M[1, j]
                out[i, j] += x2 * M[2, j]
        return
    for i in prange(r):
        for j in range(c):
            out[i, j] = 0.0
        for k in range(m):
            x = X[i, k]
            for j in range(c):
                out[i, j] += x * M[k, j]


@njit(cache=True, parallel=True)
def rows_dot(Y, u, out):
    """``out[i] = sum_j Y[i, j] u[j]``, summed in increasing ``j``."""
    r, n = Y.shape
    for i in prange(r):
        acc = 0.0
        for j in range(n):
            acc += Y[i, j] * u[j]
        out[i] = acc


# serialised when numba's threading layer is not thread-safe
guard_module(globals())
