"""Numpy reference of the multi-scale E8 Voronoi encoder (imports nothing from
nqlib). Same arithmetic as ``nqlib.kernels.cpu.nested``, so results agree bit
for bit."""

import numpy as np

from .lattices import (
    _lattice_coordinates,
    _lattice_point,
    _sq_dist_sequential,
    closest_point_e8,
)


def e8_generator():
    G = np.zeros((8, 8))
    G[0, 0] = 2.0
    for k in range(1, 7):
        G[k, k] = 1.0
        G[k - 1, k] = -1.0
    G[:, 7] = 0.5
    return G


def encode_multiscale(x, q, betas, z):
    """Per row: the scale whose decoded output is nearest (first wins ties).

    Returns ``codes (m, 8) int64, index (m,) int64, sqerr (m,)``.
    """
    G = e8_generator()
    Gi = np.linalg.inv(G)
    x = np.asarray(x, dtype=np.float64)
    m = x.shape[0]
    best_err = np.full(m, np.inf)
    best_idx = np.zeros(m, dtype=np.int64)
    best_codes = np.zeros((m, 8), dtype=np.int64)
    for s, beta in enumerate(betas):
        v = x / beta + z
        t = closest_point_e8(v)
        k = _lattice_coordinates(t, Gi)
        codes = np.mod(k, q)
        y = _lattice_point(codes, G)
        u = closest_point_e8(y / q)
        over = np.any(_lattice_coordinates(u, Gi) * q != codes - k, axis=-1)
        r = np.where(over[:, None], beta * ((y - q * u) - z), beta * (t - z))
        e = _sq_dist_sequential(r, x)
        better = e < best_err
        best_err = np.where(better, e, best_err)
        best_idx = np.where(better, s, best_idx)
        best_codes = np.where(better[:, None], codes, best_codes)
    return best_codes, best_idx, best_err


def decode_multiscale(codes, index, q, betas, z):
    G = e8_generator()
    y = _lattice_point(codes, G)
    beta = np.asarray(betas, dtype=np.float64)[index][:, None]
    return beta * ((y - q * closest_point_e8(y / q)) - z)
