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
    a = codes.shape[0]
    ng = scales.shape[1]
    g = codes.shape[1] // ng
    lo = -(2 ** (bits - 1))
    Q = (codes.reshape(a, ng, g) + lo).astype(np.float64)
    X = Q * scales.astype(np.float64)[:, :, None]
    return X.reshape(a, ng * g)[:, :n]
