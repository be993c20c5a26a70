"""Numpy reference of the multi-scale E8 Voronoi encoder (imports nothing from
nqlib). Same arithmetic as ``nqlib.kernels.cpu.nested``, so results agree bit
for bit."""

import numpy as np

from .lattices import (
    closest_point_e8,
    lattice_coordinates,
    lattice_point,
    sq_dist_sequential,
)


def e8_generator():
    """A generator matrix of E8 (rows: basis vectors), built entry by entry."""
    G = np.zeros((8, 8))
    G[0, 0] = 2.0
    for k in range(1, 7):
        G[k, k] = 1.0
        G[k - 1, k] = -1.0
    G[:, 7] = 0.5
    return G


def encode_multiscale(x, q, betas, z):
    """Per row: among scales without overload, the one with the smallest
    granular error ``||beta (t - z) - x||^2`` (first wins ties); when all
    overload, the one whose decoded output is nearest.

    Returns ``codes (m, 8) int64, index (m,) int64, sqerr (m,)``.
    """
    G = e8_generator()
    Gi = np.linalg.inv(G)
    x = np.asarray(x, dtype=np.float64)
    m = x.shape[0]
    k = len(betas)
    gran = np.empty((m, k))
    dec = np.empty((m, k))
    over = np.empty((m, k), dtype=bool)
    all_codes = np.empty((k, m, 8), dtype=np.int64)
    for s, beta in enumerate(betas):
        v = x / beta + z
        t = closest_point_e8(v)
        kc = lattice_coordinates(t, Gi)
        codes = np.mod(kc, q)
        y = lattice_point(codes, G)
        u = closest_point_e8(y / q)
        over[:, s] = np.any(lattice_coordinates(u, Gi) * q != codes - kc, axis=-1)
        gran[:, s] = sq_dist_sequential(beta * (t - z), x)
        dec[:, s] = sq_dist_sequential(beta * ((y - q * u) - z), x)
        all_codes[s] = codes
    masked = np.where(over, np.inf, gran)
    idx = np.argmin(masked, axis=1)
    fallback = np.all(over, axis=1)
    idx = np.where(fallback, np.argmin(dec, axis=1), idx)
    rows = np.arange(m)
    err = np.where(fallback, dec[rows, idx], gran[rows, idx])
    return all_codes[idx, rows], idx, err


def decode_multiscale(codes, index, q, betas, z):
    """Oracle decode of the multi-scale Voronoi code: ``beta_i (x - q Q(x/q)
    - z)`` with ``x = G codes`` and ``beta_i = betas[index]``."""
    G = e8_generator()
    y = lattice_point(codes, G)
    beta = np.asarray(betas, dtype=np.float64)[index][:, None]
    return beta * ((y - q * closest_point_e8(y / q)) - z)
