"""Approximate matrix multiplication from quantized operands.

``inner_products(QA, QB)`` estimates ``A.T @ B`` -- the inner products of
every column of ``A`` with every column of ``B`` -- from two separately
quantized matrices (``quantize`` codes the columns). When both were
rotated with the same seed (and code the same length), the product is
formed in the rotated domain, where the decoded vectors live:

    C_hat[i, j] = n mu_i nu_j + (s_i t_j / n') <x_hat_i, y_hat_j>,

with ``mu, nu`` the column means, ``s, t`` the column norms and ``x_hat``,
``y_hat`` the decoded, shrunk, rotated vectors of length ``n'``. Otherwise
(different methods or pipelines) both operands are dequantized first; the
result is the same estimate, computed more slowly.

Book: chapter "The practical quantizer", label ``ch-practical``.
"""

from __future__ import annotations

import warnings

import numpy as np

from nqlib import _backend
from nqlib.quantizers.matrix import QuantizedMatrix
from nqlib.theory.distortion import matmul_distortion

__all__ = ["inner_products", "matmul", "matmul_distortion", "same_domain"]


def _check_pair(QA, QB):
    for name, Q in (("QA", QA), ("QB", QB)):
        if not isinstance(Q, QuantizedMatrix):
            raise ValueError(f"{name} must be a QuantizedMatrix (from "
                             f"nqlib.quantize), got {type(Q).__name__}")
    if QA.shape[0] != QB.shape[0]:
        raise ValueError(f"inner dimensions differ: QA has n={QA.shape[0]} rows, "
                         f"QB has n={QB.shape[0]}")
    if QA.rotate and QB.rotate and QA.seed != QB.seed:
        raise ValueError(f"QA and QB were rotated with different seeds "
                         f"({QA.seed} and {QB.seed}); quantize both with the "
                         "same seed")


def inner_products(QA, QB, *, backend="auto") -> np.ndarray:
    """Estimate ``A.T @ B`` from ``QA = quantize(A)`` and ``QB = quantize(B)``.

    Entry ``(i, j)`` estimates ``<a_i, b_j>``, the inner product of column
    ``i`` of ``A`` with column ``j`` of ``B`` (both matrices have ``n``
    rows; :func:`nqlib.quantize` codes columns). To estimate ``X @ Y``,
    quantize ``X.T`` and ``Y``.

    Parameters
    ----------
    QA, QB : QuantizedMatrix
        Shapes (n, a) and (n, b), quantized with the same seed when rotated.
    backend : {"auto", "numpy", "numba", "triton"}
        ``"auto"``, ``"numpy"`` and ``"numba"`` decode on the CPU (numba
        kernels) and multiply with numpy. ``"triton"`` needs two nested,
        fixed-mode operands: it builds their GPU layouts on the host (one
        numba pass records the decoder's decisions), decodes them on the GPU
        with the kernels of :mod:`nqlib.kernels.gpu.matmul_triton`
        (bit-identical to the CPU decoders), applies the projections,
        shrinkage and rotations in torch (float64) and multiplies there; CPU
        tensors and the Triton interpreter stand in for a GPU when
        ``TRITON_INTERPRET=1``. Layouts are not cached between calls: for
        repeated products with one weight, use :class:`nqlib.nn.QuantLinear`.

    Returns
    -------
    ndarray, shape (a, b)
        The estimate ``A_hat.T @ B_hat`` (float64). The backends agree to
        float64 round-off.

    Raises
    ------
    ValueError
        Different inner dimensions, different seeds for rotated operands, an
        argument that is not a QuantizedMatrix, or ``backend="triton"`` for
        operands it does not support.
    RuntimeError
        ``backend="triton"`` without torch and triton, or without a CUDA
        device (or the Triton interpreter); the message says what is
        missing.

    Examples
    --------
    >>> import numpy as np, nqlib
    >>> rng = np.random.default_rng(0)
    >>> A, B = rng.standard_normal((256, 3)), rng.standard_normal((256, 2))
    >>> C = nqlib.inner_products(nqlib.quantize(A, 4.0), nqlib.quantize(B, 4.0))
    >>> C.shape  # (a, b), like A.T @ B
    (3, 2)

    Notes
    -----
    Book: chapter "The practical quantizer", label ``ch-practical``; the
    GPU path: chapter "Kernels: CPU and GPU", label ``ch-kernels``.
    """
    _check_pair(QA, QB)
    if backend == "triton":
        return _matmul_triton(QA, QB)
    _backend.resolve(backend, tensor_input=False)
    n = QA.shape[0]
    if not same_domain(QA, QB):
        return QA.dequantize().T @ QB.dequantize()
    X = QA.coded_rows() * QA.row_scales()[:, None]
    Y = QB.coded_rows() * QB.row_scales()[:, None]
    C = X @ Y.T
    if QA.center:
        C += n * np.outer(QA.means.astype(np.float64), QB.means.astype(np.float64))
    return C


def matmul(QA, QB, *, backend="auto") -> np.ndarray:
    """Deprecated name of :func:`inner_products` (which it calls).

    ``matmul(QA, QB)`` returns ``A.T @ B``, which a numpy or torch user
    would misread as ``QA @ QB``; it will be removed in the next release.
    """
    warnings.warn("nqlib.matmul(QA, QB) is deprecated: it returns A.T @ B; "
                  "call nqlib.inner_products(QA, QB), which does the same",
                  DeprecationWarning, stacklevel=2)
    return inner_products(QA, QB, backend=backend)


def same_domain(QA, QB) -> bool:
    """Whether the product of ``QA`` and ``QB`` can be formed in the coded
    (rotated, padded, centred) domain: both were coded the same way."""
    return (QA.rotate == QB.rotate and QA.n_pad == QB.n_pad
            and QA.center == QB.center
            # the rotation is drawn as the format version draws it
            and (not QA.rotate or QA.version == QB.version))


def _matmul_triton(QA, QB) -> np.ndarray:
    """The ``"triton"`` branch of :func:`inner_products`: GPU decode, torch
    product."""
    for name, Q in (("QA", QA), ("QB", QB)):
        if Q.method != "nested" or Q.mode != "fixed":
            raise ValueError(f"backend='triton' needs nested fixed-mode operands; "
                             f"{name} has method={Q.method!r}, mode={Q.mode!r}")
    _backend.resolve("triton", tensor_input=True)   # RuntimeError if unusable
    import torch

    from nqlib.quantizers import fixed_layout as fl

    # a CUDA device, else CPU tensors for the Triton interpreter
    device = _backend.default_torch_device()
    n = QA.shape[0]
    if not same_domain(QA, QB):
        C = fl.dequantized_rows(QA, device=device) @ fl.dequantized_rows(
            QB, device=device).T
    else:
        def scaled(Q):
            scales = torch.from_numpy(Q.row_scales()).to(device)
            return fl.decoded_rows(Q, device=device) * scales[:, None]

        C = scaled(QA) @ scaled(QB).T
        if QA.center:
            mu = torch.from_numpy(QA.means.astype(np.float64)).to(device)
            nu = torch.from_numpy(QB.means.astype(np.float64)).to(device)
            C = C + n * torch.outer(mu, nu)
    return C.cpu().numpy()
