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
