"""Shared argument validation. Every public entry point validates here, so that
bad input fails early with a message naming the argument, never deep in a
kernel."""

from __future__ import annotations

import numbers

import numpy as np

from nqlib import _backend


def to_numpy(x):
    """``x`` as a numpy array; torch tensors are detached and copied to the
    CPU first.

    numpy has no bfloat16: a ``torch.bfloat16`` tensor becomes float32, which
    holds every bfloat16 value exactly. Other dtypes keep their numpy
    equivalent (float16 stays float16). Anything that is not a tensor is
    returned as given (``np.asarray`` is left to the caller).
    """
    if not _backend.is_torch_tensor(x):
        return x
    import torch

    t = x.detach()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    # force=True: also resolves conjugate / negative views and moves the data
    # off an accelerator
    return t.numpy(force=True)


def as_float_array(x, name: str, *, last_dim: int | None = None,
                   ndim: int | None = None, dtype=None) -> np.ndarray:
    """Return ``x`` as a finite floating ndarray, or raise ``ValueError``.

    Parameters
    ----------
    x : array_like or torch.Tensor
        The data, in any memory layout (non-contiguous, Fortran-ordered); a
        tensor of any device and real dtype, bfloat16 and float16 included
        (see :func:`to_numpy`).
    name : str
        The argument's name, used in error messages.
    last_dim : int, optional
        Required size of the last axis.
    ndim : int, optional
        Required number of dimensions.
    dtype : numpy dtype, optional
        Target float dtype; by default float32 stays float32 and anything
        else becomes float64.
    """
    arr = np.asarray(to_numpy(x))
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.integer)
        or arr.dtype == np.bool_
    ):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if dtype is None:
        dtype = np.float32 if arr.dtype == np.float32 else np.float64
    arr = arr.astype(dtype, copy=False)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if last_dim is not None and (arr.ndim == 0 or arr.shape[-1] != last_dim):
        raise ValueError(
            f"{name} must have last dimension {last_dim}, got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf")
    return arr


def check_int(value, name: str, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """Return ``value`` as a Python int, or raise ``ValueError`` (not an
    integer, or outside ``[minimum, maximum]``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_positive(value, name: str) -> float:
    """Return ``value`` as a finite positive float, or raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_real(value, name: str, *, low: float | None = None,
               high: float | None = None) -> float:
    """Return ``value`` as a finite float within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_float_tensor(x, name: str, dim: int) -> None:
    """Validate a torch tensor argument of vectors.

    Parameters
    ----------
    x : torch.Tensor
        Vectors along the last axis.
    name : str
        The argument's name, for the messages.
    dim : int
        The required last dimension.

    Raises
    ------
    ValueError
        When the last dimension is not ``dim``, the dtype is not floating, or
        an entry is NaN or Inf.
    """
    import torch

    if x.ndim == 0 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have last dimension {dim}, got shape "
                         f"{tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
