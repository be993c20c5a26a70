"""The book's figure of merit for an approximate product, in plain numpy
(no sympy): every layer that measures a product imports it from here.

Book: chapter "The problem: compressing for the product", label
``ch-problem``.
"""

from __future__ import annotations

import numpy as np

from nqlib import _checks

__all__ = ["matmul_distortion"]


def _matrix(x, name):
    """``x`` as a finite float64 2-D array."""
    return _checks.as_float_array(x, name, ndim=2, dtype=np.float64)


def matmul_distortion(A, B, C_hat):
    """Normalised product error ``||A^T B - C_hat||_F^2 / (n a b)``.

    Parameters
    ----------
    A : array_like, shape (n, a)
    B : array_like, shape (n, b)
    C_hat : array_like, shape (a, b)
        An estimate of ``A.T @ B``.

    Returns
    -------
    float
        The squared Frobenius error per product entry and per unit of the
        inner dimension; its expectation is 1 for ``C_hat = 0`` on iid
        N(0, 1) data.

    Raises
    ------
    ValueError
        On non-finite or mis-shaped input.

    Notes
    -----
    Book: chapter "The problem: compressing for the product", label
    ``ch-problem``.
    """
    A = _matrix(A, "A")
    B = _matrix(B, "B")
    C_hat = _matrix(C_hat, "C_hat")
    n, a = A.shape
    if B.shape[0] != n:
        raise ValueError(f"A and B must have the same number of rows, got "
                         f"{A.shape} and {B.shape}")
    b = B.shape[1]
    if C_hat.shape != (a, b):
        raise ValueError(f"C_hat must have shape {(a, b)}, got {C_hat.shape}")
    err = A.T @ B - C_hat
    return float(np.sum(err * err) / (n * a * b))
