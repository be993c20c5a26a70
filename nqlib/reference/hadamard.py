"""Dense reference for the randomised Hadamard rotation (imports nothing from nqlib)."""

import numpy as np
from scipy.linalg import hadamard


def rotation_matrix(signs, power_of_two, orthogonal):
    """The dense n x n matrix ``(H_{2^k} / 2^(k/2)) ⊗ O_m · diag(signs)``.

    Acting on a vector ``x`` of length ``n = 2^k m``, reshaped row-major to
    ``(2^k, m)``: ``vec(H X O^T)`` after the sign flips.
    """
    H = hadamard(power_of_two).astype(np.float64) / np.sqrt(power_of_two)
    return np.kron(H, np.asarray(orthogonal, dtype=np.float64)) * np.asarray(
        signs, dtype=np.float64)[None, :]


def rotate_rows_float32(x, xsum, signs, power_of_two, orthogonal, center):
    """The fused CPU kernels' rotation of float32 rows, in numpy, operation
    for operation: row ``r`` of ``x`` (M, n), with ``mean = xsum[r] / n``
    when ``center`` (else 0), becomes ``P [x_r - mean; 0]`` (length
    ``n_pad = 2^k m``) in float32 arithmetic, in this order:

    * ``(x - mean) * sign`` per coordinate of ``x`` (``signs`` has
      ``n_pad`` entries; when it is empty there is no rotation: the result
      is ``[x_r - mean; 0]``);
    * for ``m > 1``, ``O_m`` within each group of ``m`` coordinates (the row
      as a (2^k, m) matrix): ``sum_c O[a, c] y_c`` from 0 in increasing
      ``c``, products and sums rounded apart;
    * the butterflies ``(lo, hi) -> (lo + hi, lo - hi)`` of the Walsh-Hadamard
      transform along the 2^k groups, in increasing span;
    * times ``float32(1 / sqrt(2^k))``.

    ``xsum`` (M,) are the row sums the kernel formed (their order of
    summation is the kernel's own).
    """
    x = np.asarray(x, dtype=np.float32)
    M, n = x.shape
    O = np.asarray(orthogonal, dtype=np.float32)
    m = O.shape[0]
    p = int(power_of_two)
    n_pad = p * m
    mean = (np.asarray(xsum, dtype=np.float32) / np.float32(n) if center
            else np.zeros(M, np.float32))
    y = np.zeros((M, n_pad), np.float32)
    y[:, :n] = x - mean[:, None]
    if len(signs) == 0:
        return y
    y[:, :n] *= np.asarray(signs, dtype=np.float32)[:n]
    Y = y.reshape(M, p, m)
    if m > 1:
        Z = np.empty_like(Y)
        for a in range(m):
            acc = np.zeros((M, p), np.float32)
            for c in range(m):
                acc = acc + O[a, c] * Y[:, :, c]
            Z[:, :, a] = acc
        Y = Z
    span = 1
    while span < p:
        V = Y.reshape(M, p // (2 * span), 2, span, m)
        lo, hi = V[:, :, 0].copy(), V[:, :, 1].copy()
        V[:, :, 0] = lo + hi
        V[:, :, 1] = lo - hi
        Y = V.reshape(M, p, m)
        span *= 2
    return Y.reshape(M, n_pad) * np.float32(1.0 / np.sqrt(p))
