"""Seeded random rotations: a randomised Hadamard transform for any length.

For ``n = 2^k m`` with ``m`` odd, the rotation is

    P = (H_{2^k} / 2^(k/2)) ⊗ O_m · diag(s),

with ``s`` random signs, ``H`` the Sylvester Hadamard matrix and ``O_m`` a
Haar-random ``m x m`` orthogonal matrix (the identity when ``m = 1``). It is
orthogonal, costs ``O(n (k + m))`` per vector, and needs no padding, so no
rate is spent on padded coordinates. All randomness is drawn here, in the
API layer, from the seed; kernels receive arrays. The draw is part of the
file format: ``version=3`` (the default) draws the signs and ``O_m`` with
nqlib's own generator and transforms (:mod:`nqlib.quantizers.draws`) and
applies ``O_m`` in a fixed order of operations, so a file decodes to the same
bits everywhere; ``version=2`` repeats what format-version-2 files used
(numpy's ``Generator.choice`` / ``standard_normal``, ``np.linalg.qr``, BLAS).

Book: chapter "The practical quantizer", label ``ch-practical``.
"""

from __future__ import annotations

import functools

import numpy as np

from nqlib import _backend, _checks
from nqlib.quantizers import draws

__all__ = ["RandomHadamard"]


def _split_power_of_two(n: int) -> tuple[int, int]:
    p = n & (-n)  # largest power of two dividing n
    return p, n // p


#: draw versions RandomHadamard reproduces (the format versions of nqlib files)
VERSIONS = (2, 3)


@functools.lru_cache(maxsize=32)
def _rotation_parameters(n: int, seed: int, version: int = 3):
    p, m = _split_power_of_two(n)
    if version >= draws.FIRST_OWN_DRAWS:
        signs = draws.signs(draws.stream_key(seed, n, draws.ROTATION_SIGNS), n)
        O = (np.ones((1, 1)) if m == 1 else
             draws.haar_orthogonal(draws.stream_key(seed, n, draws.ROTATION_ODD), m))
    else:
        rng = np.random.default_rng([seed, n, 0x6E71])  # 'nq': rotation stream
        signs = rng.choice(np.array([-1.0, 1.0]), size=n)
        if m == 1:
            O = np.ones((1, 1))
        else:
            # Haar measure: QR of a Gaussian matrix with the signs of R's
            # diagonal moved into Q (Mezzadri 2007).
            Z = rng.standard_normal((m, m))
            Q, Rm = np.linalg.qr(Z)
            O = Q * np.sign(np.diag(Rm))[None, :]
    signs.setflags(write=False)
    O.setflags(write=False)
    return signs, p, O


class RandomHadamard:
    """A seeded orthogonal rotation of R^n, fast for any n.

    Parameters
    ----------
    n : int
        Dimension (>= 1).
    seed : int
        Shared seed: the encoders of both matrices and the decoder build the
        same rotation from it.
    version : {3, 2}
        Which draw: 3 (default) nqlib's own generator, Haar factor by
        Gram-Schmidt and a fixed-order product (the same bits on every
        machine); 2 the numpy/LAPACK/BLAS draw of format-version-2 files.

    Notes
    -----
    Vectors are the **rows** of the arrays given to :meth:`apply` and
    :meth:`inverse` (shape ``(..., n)``). ``n = 2^k m``: the cost per vector is
    ``n k`` additions for the Hadamard factor plus ``n m`` multiply-adds for
    the dense odd factor ``O_m``; choose ``n`` with a large power of two
    (e.g. 4096 = 2^12, 384 = 2^7 * 3).

    Examples
    --------
    >>> import numpy as np, nqlib
    >>> P = nqlib.RandomHadamard(12, seed=1)
    >>> x = np.arange(12.0)
    >>> bool(np.isclose(np.linalg.norm(P.apply(x)), np.linalg.norm(x)))
    True
    """

    def __init__(self, n: int, seed: int = 0, *, version: int = 3):
        self.n = _checks.check_int(n, "n", minimum=1)
        self.seed = _checks.check_int(seed, "seed", minimum=0)
        if self.seed >= 2**64:
            raise ValueError(f"seed must be < 2**64, got {self.seed}")
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
        self.version = int(version)
        self.signs, self.power_of_two, self.orthogonal = _rotation_parameters(
            self.n, self.seed, self.version)

    def __repr__(self) -> str:
        m = self.n // self.power_of_two
        legacy = "" if self.version == VERSIONS[-1] else f", version={self.version}"
        return (f"RandomHadamard(n={self.n} = {self.power_of_two} x {m}, "
                f"seed={self.seed}{legacy})")

    def matrix(self) -> np.ndarray:
        """The dense ``n x n`` matrix ``P`` (reference; O(n^2) memory)."""
        from nqlib.reference.hadamard import rotation_matrix

        return rotation_matrix(self.signs, self.power_of_two, self.orthogonal)

    def _check(self, x):
        arr = _checks.as_float_array(x, "x", last_dim=self.n, dtype=np.float64)
        return arr

    def apply(self, x, *, backend: str = "auto"):
        """``P x`` for every row ``x`` of ``x`` (shape ``(..., n)``).

        An ndarray gives a float64 ndarray. A torch tensor gives a tensor on
        its device: float64 stays float64, other dtypes are computed and
        returned in float32 (half types are returned in their own dtype).
        ``backend="auto"`` runs Triton for CUDA tensors (and for CPU tensors
        under ``TRITON_INTERPRET=1``), numba otherwise.
        """
        if _backend.is_torch_tensor(x):
            return self._tensor_rows(x, backend, inverse=False)
        arr = self._check(x)
        backend = _backend.resolve(backend, tensor_input=False)
        if backend == "numpy":
            return arr @ self.matrix().T
        rows = np.array(arr.reshape(-1, self.n), dtype=np.float64, order="C")
        rows *= self.signs
        return self._mix(rows, transpose=False).reshape(arr.shape)

    def inverse(self, y, *, backend: str = "auto"):
        """``P^T y`` for every row (the inverse rotation); types as in
        :meth:`apply`."""
        if _backend.is_torch_tensor(y):
            return self._tensor_rows(y, backend, inverse=True)
        arr = self._check(y)
        backend = _backend.resolve(backend, tensor_input=False)
        if backend == "numpy":
            return arr @ self.matrix()
        rows = np.array(arr.reshape(-1, self.n), dtype=np.float64, order="C")
        out = self._mix(rows, transpose=True)
        out *= self.signs
        return out.reshape(arr.shape)

    def _tensor_rows(self, x, backend, *, inverse):
        """``P x`` (or ``P^T x``) for a torch tensor, on its device."""
        import torch

        backend = _backend.resolve(backend, tensor_input=True,
                                   device=_backend.tensor_device(x))
        if x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"x must be a real numeric array, got dtype {x.dtype}")
        if x.ndim == 0 or x.shape[-1] != self.n:
            raise ValueError(f"x must have last dimension {self.n}, got shape "
                             f"{tuple(x.shape)}")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        if backend != "triton":
            arr = x.detach().to("cpu", torch.float64).numpy()
            op = self.inverse if inverse else self.apply
            out = torch.from_numpy(op(arr, backend=backend))
            return out.to(device=x.device, dtype=out_dtype)
        from nqlib.kernels.gpu.hadamard_triton import random_hadamard

        rows = x.detach().reshape(-1, self.n).to(work).contiguous()
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("x contains NaN or Inf")
        # the cached parameters are read-only arrays: copy them into torch
        signs = torch.tensor(self.signs, dtype=work, device=x.device)
        O = torch.tensor(self.orthogonal, dtype=work, device=x.device)
        out = random_hadamard(rows, signs, O, self.power_of_two, inverse=inverse)
        return out.reshape(x.shape).to(out_dtype)

    def _mix(self, rows, *, transpose):
        # (H ⊗ O) acting on rows reshaped to (p, m): H along p, O along m.
        from nqlib.kernels.cpu.hadamard import fwht_rows

        p = self.power_of_two
        m = self.n // p
        r = rows.shape[0]
        if m > 1:
            O = self.orthogonal.T if transpose else self.orthogonal
            flat = rows.reshape(r * p, m)
            if self.version >= draws.FIRST_OWN_DRAWS:
                # a fixed order of operations: the same bits on every machine
                from nqlib.kernels.cpu.linalg import rows_times_matrix

                out = np.empty_like(flat)
                rows_times_matrix(flat, np.ascontiguousarray(O.T), out)
                rows = out.reshape(r, self.n)
            else:
                rows = (flat @ O.T).reshape(r, self.n)
        if p > 1:
            # move the Hadamard axis last, transform, move it back
            t = np.ascontiguousarray(rows.reshape(r, p, m).transpose(0, 2, 1))
            t = t.reshape(r * m, p)
            fwht_rows(t, 1.0 / np.sqrt(p))
            rows = np.ascontiguousarray(t.reshape(r, m, p).transpose(0, 2, 1))
        return rows.reshape(r, self.n)
