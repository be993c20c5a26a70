"""Scalar baselines: round-to-nearest integers with per-group scales.

``method="rtn"`` is what int4 weight quantization does in practice: split
each column into groups of ``group_size`` consecutive entries, scale each
group by ``absmax / (2^(b-1) - 1)`` (stored as float16) and round to the
nearest integer in ``[-2^(b-1), 2^(b-1) - 1]``. It costs
``b + 16 / group_size`` bits per entry. ``method="rtn-hadamard"`` does the
same after the shared random rotation (QuaRot / SpinQuant style), which
spreads outliers.

Book: chapter "The practical quantizer", label ``ch-practical``.
"""

from __future__ import annotations

import numpy as np


def rtn_encode(X, bits, group_size):
    """Quantize rows of ``X`` (a, n): returns (codes int64 (a, n_pad) in
    [0, 2^bits), scales float16 (a, n_groups))."""
    a, n = X.shape
    g = group_size
    ng = -(-n // g)
    Xp = np.zeros((a, ng * g))
    Xp[:, :n] = X
    Xg = Xp.reshape(a, ng, g)
    top = 2 ** (bits - 1) - 1
    absmax = np.abs(Xg).max(axis=2)
    scales = (absmax / max(top, 1)).astype(np.float16)
    s = scales.astype(np.float64)
    # float16 can round a tiny scale to 0 or a huge one to inf
    if not np.all(np.isfinite(s)):
        raise ValueError("a group's scale overflows float16 (|entries| > 65504 * "
                         f"{max(top, 1)}); rescale the matrix first")
    if np.any((absmax > 0) & (s < np.finfo(np.float16).tiny)):
        raise ValueError("a group's scale underflows float16 (|entries| below "
                         f"about {np.finfo(np.float16).tiny * max(top, 1):.1e}); "
                         "rescale the matrix first")
    safe = np.where(s > 0, s, 1.0)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    Q = np.clip(np.floor(Xg / safe[:, :, None] + 0.5), lo, hi)
    Q = np.where((s > 0)[:, :, None], Q, 0.0)
    codes = (Q - lo).astype(np.int64).reshape(a, ng * g)
    return codes, scales


def rtn_decode(codes, scales, bits, n):
    """Decoded vectors (a, n) of :func:`rtn_encode`'s ``bits``-bit ``codes``
    and per-group ``scales`` (a, groups)."""
    a = codes.shape[0]
    ng = scales.shape[1]
    g = codes.shape[1] // ng
    lo = -(2 ** (bits - 1))
    Q = (codes.reshape(a, ng, g) + lo).astype(np.float64)
    X = Q * scales.astype(np.float64)[:, :, None]
    return X.reshape(a, ng * g)[:, :n]


def rtn_asym_encode(X, bits, group_size):
    """Asymmetric round-to-nearest of the rows of ``X`` (a, n) in groups.

    Each group of ``group_size`` consecutive entries of a row (the last one
    zero-padded) is mapped affinely onto the integers ``0 .. 2^bits - 1``:
    the group's minimum ``z`` and step ``s = (max - min) / (2^bits - 1)`` are
    stored as float16, and an entry ``x`` gets the code
    ``clip(round((x - z) / s), 0, 2^bits - 1)``, computed with the stored
    (float16-rounded) ``z`` and ``s`` so that encoder and decoder agree. This
    is the usual "scale and zero" (or "scale and min", llama.cpp's Q4_1)
    int-b baseline; it costs ``b + 32 / group_size`` bits per entry.

    Parameters
    ----------
    X : array_like, shape (a, n)
        Real, finite rows.
    bits : int
        Integer width, 1..8.
    group_size : int
        Group length (>= 1).

    Returns
    -------
    codes : ndarray of uint8, shape (a, n_groups * group_size)
    steps, mins : ndarray of float16, shape (a, n_groups)

    Raises
    ------
    ValueError
        Bad shape, non-finite entries, ``bits`` or ``group_size`` out of
        range, or a group whose minimum or step does not fit float16.

    Examples
    --------
    >>> import numpy as np
    >>> from nqlib.quantizers.scalar import rtn_asym_decode, rtn_asym_encode
    >>> X = np.array([[0.0, 1.0, 2.0, 3.0]])
    >>> codes, steps, mins = rtn_asym_encode(X, 2, 4)
    >>> codes.tolist(), rtn_asym_decode(codes, steps, mins, 4).tolist()
    ([[0, 1, 2, 3]], [[0.0, 1.0, 2.0, 3.0]])
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.size == 0:
        raise ValueError(f"X must be a non-empty 2-D array, got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError("X must be finite")
    if isinstance(bits, bool) or int(bits) != bits or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    if isinstance(group_size, bool) or int(group_size) != group_size \
            or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got "
                         f"{group_size!r}")
    bits, g = int(bits), int(group_size)
    a, n = X.shape
    ng = -(-n // g)
    Xg = np.zeros((a, ng * g))
    Xg[:, :n] = X
    if ng * g > n:  # padding repeats the row's last entry: no range added
        Xg[:, n:] = X[:, -1:]
    Xg = Xg.reshape(a, ng, g)
    top = 2**bits - 1
    lo, hi = Xg.min(axis=2), Xg.max(axis=2)
    with np.errstate(over="ignore"):
        mins = lo.astype(np.float16)
        steps = ((hi - lo) / top).astype(np.float16)
    if not (np.all(np.isfinite(mins)) and np.all(np.isfinite(steps))):
        raise ValueError("a group's minimum or step overflows float16 "
                         "(|entries| > 65504); rescale the matrix first")
    z = mins.astype(np.float64)[:, :, None]
    s = steps.astype(np.float64)[:, :, None]
    safe = np.where(s > 0, s, 1.0)
    Q = np.clip(np.floor((Xg - z) / safe + 0.5), 0, top)
    Q = np.where(s > 0, Q, 0.0)
    return Q.astype(np.uint8).reshape(a, ng * g), steps, mins


def rtn_asym_decode(codes, steps, mins, n):
    """Rows ``z + s * code`` of :func:`rtn_asym_encode`'s output, cut to
    length ``n`` (float64, shape (a, n))."""
    codes = np.asarray(codes)
    a, ng = steps.shape
    g = codes.shape[1] // ng
    Q = codes.reshape(a, ng, g).astype(np.float64)
    X = (mins.astype(np.float64)[:, :, None]
         + steps.astype(np.float64)[:, :, None] * Q)
    return X.reshape(a, ng * g)[:, :n]
