"""Reference closest-point decoders and Voronoi coders, in plain numpy.

Two kinds of oracle live here:

* vectorised Conway--Sloane decoders (``closest_point_zn`` ...), which follow
  the arithmetic contract shared by every backend, written out so that a
  reader can check each step;
* brute-force searches (``closest_point_bruteforce``), which enumerate lattice
  points near ``x`` and keep the nearest; exponential in the dimension, they
  check the fast decoders *in distance* (at a tie both answers are right).

The arithmetic contract (identical in numpy, numba and Triton):

* everything is computed in float64; inputs of other float types are
  converted first;
* rounding is ``floor(v + 0.5)`` (halves round up);
* D_n: if the rounded vector has an odd coordinate sum, the coordinate with the
  largest ``|v - f|`` (lowest index among equals) moves one step towards ``v``
  (``+1`` when ``v >= f``, else ``-1``);
* two-coset lattices (E8 = D8 u (D8 + 1/2), A2 = R u (R + p)): squared
  distances are summed coordinate by coordinate in index order, and the second
  coset wins only when strictly nearer.
"""

import itertools

import numpy as np

SQRT3 = np.sqrt(3.0)


def _round(v):
    return np.floor(v + 0.5)


def sq_dist_sequential(v, y):
    """Sum of squared differences over the last axis, in index order."""
    e = v - y
    d = e[..., 0] * e[..., 0]
    for j in range(1, v.shape[-1]):
        d = d + e[..., j] * e[..., j]
    return d


def closest_point_zn(v):
    """Nearest point of Z^n: coordinatewise ``floor(v + 0.5)``."""
    return _round(np.asarray(v, dtype=np.float64))


def closest_point_dn(v):
    """Nearest point of D_n (integer vectors with an even sum), Conway & Sloane."""
    v = np.asarray(v, dtype=np.float64)
    f = _round(v)
    err = np.abs(v - f)
    worst = np.argmax(err, axis=-1)  # first maximum: lowest index on ties
    odd = (f.sum(axis=-1) % 2) != 0
    vw = np.take_along_axis(v, worst[..., None], axis=-1)[..., 0]
    fw = np.take_along_axis(f, worst[..., None], axis=-1)[..., 0]
    step = np.where(vw >= fw, 1.0, -1.0)
    out = f.copy()
    np.put_along_axis(out, worst[..., None], (fw + np.where(odd, step, 0.0))[..., None],
                      axis=-1)
    return out


def closest_point_e8(v):
    """Nearest point of E8 = D8 u (D8 + 1/2): decode both cosets, keep the nearer."""
    v = np.asarray(v, dtype=np.float64)
    y0 = closest_point_dn(v)
    y1 = closest_point_dn(v - 0.5) + 0.5
    d0 = sq_dist_sequential(v, y0)
    d1 = sq_dist_sequential(v, y1)
    return np.where((d1 < d0)[..., None], y1, y0)


def _closest_point_rect(v):
    """Nearest point of the rectangular lattice Z x sqrt(3) Z."""
    out = np.empty_like(v)
    out[..., 0] = _round(v[..., 0])
    out[..., 1] = _round(v[..., 1] / SQRT3) * SQRT3
    return out


def closest_point_a2(v):
    """Nearest point of the hexagonal lattice A2 (basis (1, 0), (1/2, sqrt3/2)).

    A2 is the union of the rectangular lattice R = Z x sqrt(3) Z and its coset
    R + (1/2, sqrt(3)/2): decode both, keep the nearer.
    """
    v = np.asarray(v, dtype=np.float64)
    shift = np.array([0.5, SQRT3 / 2])
    y0 = _closest_point_rect(v)
    y1 = _closest_point_rect(v - shift) + shift
    d0 = sq_dist_sequential(v, y0)
    d1 = sq_dist_sequential(v, y1)
    return np.where((d1 < d0)[..., None], y1, y0)


CLOSEST_POINT = {
    "Zn": closest_point_zn,
    "Dn": closest_point_dn,
    "E8": closest_point_e8,
    "A2": closest_point_a2,
}


def closest_point_bruteforce(x, generator, radius=2):
    """Nearest lattice point by exhaustive search (small dimensions only).

    Searches the integer coordinates ``round(G^-1 x) + {-radius..radius}^d``
    and returns a nearest candidate. Cost ``(2 radius + 1)^d`` per row.

    Parameters
    ----------
    x : ndarray, shape (m, d)
    generator : ndarray, shape (d, d)
        Basis vectors as columns.
    radius : int
        Half-width of the search box in lattice coordinates. 2 suffices for
        Z^n and for the reduced basis of A2 (checked in the tests against
        radius 4). It does *not* suffice for the E8 basis of
        :func:`nqlib.lattices.E8`, which is far from reduced (Gaussian
        inputs find nearer points outside the box), and the D_n basis is not
        reduced either: use :func:`closest_point_e8_bruteforce` and
        :func:`closest_point_dn_bruteforce` for those.
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    G = np.asarray(generator, dtype=np.float64)
    d = G.shape[0]
    steps = np.array(list(itertools.product(range(-radius, radius + 1), repeat=d)),
                     dtype=np.float64)
    centre = np.floor(np.linalg.solve(G, x.T).T + 0.5)
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        cand = (centre[i] + steps) @ G.T
        out[i] = cand[np.argmin(((cand - x[i]) ** 2).sum(axis=1))]
    return out


def closest_point_dn_bruteforce(x):
    """Nearest D_n point: every even-sum vector in ``round(x) + {-1, 0, 1}^n``.

    The nearest point differs from ``round(x)`` in at most one coordinate, by
    one, so it lies in that box. Cost ``3^n`` per row.
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    n = x.shape[1]
    steps = np.array(list(itertools.product((-1, 0, 1), repeat=n)), dtype=np.float64)
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        cand = np.floor(x[i] + 0.5) + steps
        cand = cand[cand.sum(axis=1) % 2 == 0]
        out[i] = cand[np.argmin(((cand - x[i]) ** 2).sum(axis=1))]
    return out


def closest_point_e8_bruteforce(x):
    """Nearest E8 point: brute-force D8 in both cosets, keep the nearer."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    y0 = closest_point_dn_bruteforce(x)
    y1 = closest_point_dn_bruteforce(x - 0.5) + 0.5
    d0 = ((x - y0) ** 2).sum(axis=1)
    d1 = ((x - y1) ** 2).sum(axis=1)
    return np.where((d1 < d0)[:, None], y1, y0)


def lattice_coordinates(t, generator_inverse):
    """Integer coordinates ``round(G^-1 t)`` of lattice points ``t``, as int64.

    The product is summed in index order; rounding absorbs its float error.
    """
    Gi = np.asarray(generator_inverse, dtype=np.float64)
    d = Gi.shape[0]
    c = np.empty(t.shape, dtype=np.int64)
    for j in range(d):
        s = Gi[j, 0] * t[..., 0]
        for k in range(1, d):
            s = s + Gi[j, k] * t[..., k]
        c[..., j] = np.floor(s + 0.5).astype(np.int64)
    return c


def lattice_point(c, generator):
    """``G c`` for integer coordinates ``c``, summed in index order (float64)."""
    G = np.asarray(generator, dtype=np.float64)
    d = G.shape[0]
    cf = np.asarray(c, dtype=np.float64)
    y = np.empty(cf.shape, dtype=np.float64)
    for j in range(d):
        s = G[j, 0] * cf[..., 0]
        for k in range(1, d):
            s = s + G[j, k] * cf[..., k]
        y[..., j] = s
    return y


def voronoi_encode(x, closest_point, generator, generator_inverse, q, beta, dither):
    """Voronoi-code encoder: ``t = Q(x / beta + z)``, ``c = (G^-1 t) mod q``.

    Returns ``(codes int64, overload bool)``. Overload is decided exactly as
    the decoder will act: with ``k = G^-1 t`` and ``y = G c``, the decoder
    returns ``t`` iff ``Q(y / q) = G (c - k) / q``, compared in integer
    lattice coordinates (this is ``Q(t / q) != 0`` away from ties on the
    boundary of the coarse cell, and exact on it).
    """
    x = np.asarray(x, dtype=np.float64)
    v = x / beta + dither
    t = closest_point(v)
    k = lattice_coordinates(t, generator_inverse)
    codes = np.mod(k, q)
    u = closest_point(lattice_point(codes, generator) / q)
    uk = lattice_coordinates(u, generator_inverse)
    overload = np.any(uk * q != codes - k, axis=-1)
    return codes, overload


def voronoi_decode(codes, closest_point, generator, q, beta, dither):
    """Voronoi-code decoder: ``y = G c``, ``x_hat = beta (y - q Q(y / q) - z)``."""
    y = lattice_point(codes, generator)
    return beta * ((y - q * closest_point(y / q)) - dither)
