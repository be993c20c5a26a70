"""The lower bound for quantized matrix multiplication and its phase transition.

For ``A`` (n x a) and ``B`` (n x b) with iid N(0, 1) entries, each compressed
separately to ``R`` bits per entry, every decoder output ``C_hat`` obeys

    E ||A^T B - C_hat||_F^2 >= n a b Gamma(R)

(Ordentlich & Polyanskiy, arXiv 2410.13780). Here

* ``phi(R) = 2 2^(-2R) - 2^(-4R) = 1 - (1 - 2^(-2R))^2`` is the error of
  MMSE-quantizing each matrix at the Gaussian rate-distortion limit;
* ``Gamma`` is the lower convex envelope of ``phi`` on ``[0, inf)``: ``phi``
  is concave near ``R = 0``, so ``Gamma`` follows the tangent to ``phi``
  through ``(0, phi(0)) = (0, 1)`` up to the tangency point ``R*`` and equals
  ``phi`` beyond it;
* ``R*`` solves the tangency condition ``phi(R) - 1 = R phi'(R)``, which
  factors into ``2^(2R) = 1 + 4 R ln 2``; sympy solves it through the Lambert
  W function, ``R* = (-2 W_{-1}(-1/(2 sqrt(e))) - 1) / (4 ln 2)``.

Everything is kept symbolic; the numeric functions are generated with
:func:`sympy.lambdify`, never re-typed. The symbolic solutions (``R*``, the
inverse of ``phi``) cost about a second of sympy time, so they are computed on
first use, not at import. These module attributes are built lazily and
cached:

R_STAR_EXPR : sympy expression
    The exact tangency point (-1 - 2 W_{-1}(-e^{-1/2}/2)) / (4 ln 2).
R_STAR : float
    R* = 0.906323536951553..., the double nearest the exact value.
SLOPE : float
    Slope of the linear part of Gamma, (phi(R*) - 1) / R* = phi'(R*) < 0.
GAMMA_AT_R_STAR : float
    Gamma(R*) = phi(R*).
gamma_expr : sympy Piecewise
    Gamma(R), with the exact R*.
phi_inv_expr : sympy expression in D
    The non-negative root of phi(R) = D.
gamma_inv_expr : sympy Piecewise in D
    Gamma^{-1}(D).
unbiased_bound_expr : sympy Piecewise
    Gamma(R) / (1 - Gamma(R)), the bound for unbiased schemes.

Book: chapters "The lower bound", label ``ch-lower-bound``, and "The phase
transition at R*", label ``ch-phase-transition``.
"""

from __future__ import annotations

import functools
from types import MappingProxyType

import numpy as np
import sympy as sp

#: Rate in bits per entry, and distortion per product entry and unit n.
R = sp.Symbol("R", nonnegative=True)
D = sp.Symbol("D", positive=True)

#: rho = 2^(-2R): the MSE per entry of an optimal description of N(0, 1) at
#: R bits per entry (chapter ch-rate-distortion).
rho_expr = 2 ** (-2 * R)

#: phi(R) = 2 2^(-2R) - 2^(-4R) = 1 - (1 - 2^(-2R))^2: the product error of
#: MMSE-quantizing both matrices at rate R (chapter ch-problem).
phi_expr = 2 * 2 ** (-2 * R) - 2 ** (-4 * R)

#: The tangent to phi at R passes through (0, 1): phi(R) - 1 = R phi'(R).
tangency_eq = sp.Eq(phi_expr - 1, R * sp.diff(phi_expr, R))

# Digits kept when the exact R* is turned into a number; far more than double
# precision, so that R_STAR is the double nearest to the true value.
_DIGITS = 40


@functools.cache
def _r_star_expr():
    """R* by sympy: the positive root of the tangency equation (Lambert W)."""
    r_pos = sp.Symbol("R", positive=True)
    roots = sp.solve(tangency_eq.subs(R, r_pos), r_pos)
    if len(roots) != 1:  # pragma: no cover - guards a sympy behaviour change
        raise RuntimeError(f"expected one positive tangency point, got {roots}")
    return roots[0]


def _gamma_of(r_star):
    """Gamma as a Piecewise, with the tangency point ``r_star`` (exact or Float)."""
    phi_star = phi_expr.subs(R, r_star)
    linear = 1 - (1 - phi_star) * R / r_star
    return sp.Piecewise((linear, R < r_star), (phi_expr, True))


@functools.cache
def _phi_inv_expr():
    """The inverse of phi on [0, inf): the root of phi(R) = D that is >= 0."""
    roots = sp.solve(sp.Eq(phi_expr, D), R)
    half = sp.Rational(1, 2)  # a D in (0, 1) selects the non-negative root
    keep = [r for r in roots if r.subs(D, half).evalf() >= 0]
    if len(keep) != 1:  # pragma: no cover - guards a sympy behaviour change
        raise RuntimeError(f"expected one non-negative inverse of phi, got {roots}")
    return keep[0]


def _gamma_inv_of(r_star):
    """Gamma^{-1} as a Piecewise in D, with the tangency point ``r_star``."""
    phi_star = phi_expr.subs(R, r_star)
    linear = r_star * (1 - D) / (1 - phi_star)
    return sp.Piecewise((linear, D >= phi_star), (_phi_inv_expr(), True))


def _unbiased_of(r_star):
    """Gamma / (1 - Gamma) branch by branch (the bound for unbiased schemes)."""
    (linear, cond), (curved, _) = _gamma_of(r_star).args
    # not simplified: sympy's simplest form divides powers 2**(4R) that
    # overflow at large R, while 1 - phi stays near 1 there
    return sp.Piecewise((linear / (1 - linear), cond), (curved / (1 - curved), True))


@functools.cache
def _numeric():
    """Numeric Gamma, Gamma^{-1} and the unbiased bound, from lambdify."""
    r_star = sp.Float(_r_star_expr().evalf(_DIGITS), _DIGITS)
    # cached and shared by the whole process: a read-only mapping
    return MappingProxyType({
        "r_star": float(r_star),
        "slope": float(sp.diff(_gamma_of(r_star).args[0][0], R)),
        "gamma_at_r_star": float(phi_expr.subs(R, r_star)),
        "gamma": sp.lambdify(R, _gamma_of(r_star), "numpy"),
        "gamma_inv": sp.lambdify(D, _gamma_inv_of(r_star), "numpy"),
        "unbiased": sp.lambdify(R, _unbiased_of(r_star), "numpy"),
    })


_LAZY = {
    "R_STAR_EXPR": _r_star_expr,
    "R_STAR": lambda: _numeric()["r_star"],
    "SLOPE": lambda: _numeric()["slope"],
    "GAMMA_AT_R_STAR": lambda: _numeric()["gamma_at_r_star"],
    "gamma_expr": lambda: _gamma_of(_r_star_expr()),
    "phi_inv_expr": _phi_inv_expr,
    "gamma_inv_expr": lambda: _gamma_inv_of(_r_star_expr()),
    "unbiased_bound_expr": lambda: _unbiased_of(_r_star_expr()),
}


__all__ = [
    "R", "D", "rho_expr", "phi_expr", "tangency_eq",
    "phi", "gamma", "gamma_inv", "gap_bits", "unbiased_bound",
    *_LAZY,
]


def __getattr__(name):
    # PEP 562: the symbolic solutions are computed on first access only.
    if name in _LAZY:
        return _LAZY[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


_phi_np = sp.lambdify(R, phi_expr, "numpy")


def _check_rate(value, name):
    """``value`` as a float64 array, finite and >= 0, else ValueError."""
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return arr


def _check_distortion(value, name):
    """``value`` as a float64 array in (0, 1], else ValueError."""
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0) or np.any(arr > 1):
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
    return arr


def _out(values, like):
    """A float for a scalar input, an ndarray of the input's shape otherwise."""
    values = np.broadcast_to(np.asarray(values, dtype=np.float64), np.shape(like))
    return float(values) if values.ndim == 0 else values.copy()


def phi(R):
    """Product error of MMSE-quantizing each matrix separately at rate ``R``.

    Parameters
    ----------
    R : float or array_like
        Rate in bits per entry, finite and >= 0.

    Returns
    -------
    float or ndarray
        ``phi(R) = 2 2^(-2R) - 2^(-4R) = 1 - (1 - 2^(-2R))^2``, the distortion
        ``E||A^T B - A_hat^T B_hat||_F^2 / (n a b)`` when ``A_hat, B_hat`` are
        the conditional means of iid N(0, 1) matrices given ideal Gaussian
        descriptions at ``R`` bits per entry.

    Raises
    ------
    ValueError
        If ``R`` is negative or not finite.

    Notes
    -----
    Generated from :data:`phi_expr` by :func:`sympy.lambdify`.
    Book: chapter "The problem: compressing for the product", label
    ``ch-problem``.

    Examples
    --------
    >>> phi(1.0)
    0.4375
    """
    rate = _check_rate(R, "R")
    return _out(_phi_np(rate), rate)


def gamma(R):
    """The lower bound Gamma(R) on the matmul distortion at rate ``R``.

    Parameters
    ----------
    R : float or array_like
        Rate in bits per entry, finite and >= 0.

    Returns
    -------
    float or ndarray
        ``Gamma(R) = phi(R)`` for ``R >= R*`` and ``1 + SLOPE * R`` (the
        tangent from (0, 1)) below ``R*``. No scheme, at any n, a, b, reaches
        a smaller ``E||A^T B - C_hat||_F^2 / (n a b)`` on iid N(0, 1)
        matrices.

    Raises
    ------
    ValueError
        If ``R`` is negative or not finite.

    Notes
    -----
    Generated from :data:`gamma_expr` (with ``R*`` to 40 digits) by
    :func:`sympy.lambdify`. Book: chapter "The lower bound", label
    ``ch-lower-bound``; the tangency point in chapter "The phase transition
    at R*", label ``ch-phase-transition``.

    Examples
    --------
    >>> round(gamma(4.0), 8)
    0.00779724
    """
    rate = _check_rate(R, "R")
    return _out(_numeric()["gamma"](rate), rate)


def gamma_inv(D):
    """The smallest rate at which the lower bound allows distortion ``D``.

    Parameters
    ----------
    D : float or array_like
        Distortion per product entry and unit inner dimension, in (0, 1].

    Returns
    -------
    float or ndarray
        The unique ``R >= 0`` with ``Gamma(R) = D`` (``Gamma`` decreases
        strictly from 1 to 0): ``R* (1 - D) / (1 - phi(R*))`` for
        ``D >= Gamma(R*)`` and the inverse of ``phi``,
        ``1/2 log2((1 + sqrt(1 - D)) / D)``, below.

    Raises
    ------
    ValueError
        If ``D`` is outside (0, 1] or not finite.

    Notes
    -----
    Generated from :data:`gamma_inv_expr`, whose curved branch is the root of
    ``phi(R) = D`` found by :func:`sympy.solve`; sympy's form has no
    cancellation at small ``D``. Book: chapter "The phase transition at R*",
    label ``ch-phase-transition``.

    Examples
    --------
    >>> gamma_inv(1.0)
    0.0
    """
    dist = _check_distortion(D, "D")
    return _out(_numeric()["gamma_inv"](dist), dist)


def gap_bits(rate, D):
    """Bits a scheme loses to the bound: ``rate - Gamma^{-1}(D)``.

    Parameters
    ----------
    rate : float or array_like
        Total rate the scheme spends, bits per entry (every bit the decoder
        needs), finite and >= 0.
    D : float or array_like
        The distortion it measures, ``E||A^T B - C_hat||_F^2 / (n a b)``, in
        (0, 1].

    Returns
    -------
    float or ndarray
        The gap in bits; 0 on the bound, > 0 above it. A negative value on
        Gaussian data would contradict the converse (up to Monte Carlo noise).

    Raises
    ------
    ValueError
        If ``rate`` is negative or not finite, or ``D`` is outside (0, 1].

    Notes
    -----
    Book: chapter "The phase transition at R*", label ``ch-phase-transition``.

    Examples
    --------
    >>> gap_bits(2.0, phi(1.5))
    0.5
    """
    rate_arr = _check_rate(rate, "rate")
    dist = _check_distortion(D, "D")
    out = rate_arr - _numeric()["gamma_inv"](dist)
    return _out(out, np.broadcast(rate_arr, dist))


def unbiased_bound(R):
    """Smallest distortion of an unbiased scheme at rate ``R``.

    Parameters
    ----------
    R : float or array_like
        Rate in bits per entry, finite and >= 0.

    Returns
    -------
    float or ndarray
        ``Gamma(R) / (1 - Gamma(R))`` (``inf`` at ``R = 0``). For ``R >= R*``
        this equals ``phi(R) / (1 - 2^(-2R))^2 = 2 2^(-2R) + 3 2^(-4R) +
        4 2^(-6R) + ...``, which the unbiased Gaussian test channel
        ``A_hat = A + N(0, 2^(-2R) / (1 - 2^(-2R)))`` attains.

    Raises
    ------
    ValueError
        If ``R`` is negative or not finite.

    Notes
    -----
    A scheme is unbiased when ``E[C_hat | A, B] = A^T B``. Then, per entry,
    ``E[C C_hat] = E[C^2] = n`` and ``E[C_hat^2] = n (1 + D_ij)``, so the
    scaled output ``lambda C_hat`` (itself a valid decoder) has error
    ``n D_ij / (1 + D_ij)`` at the best ``lambda``. The converse bounds the
    average of these by ``Gamma(R)``; ``x / (1 + x)`` is concave, so the
    average distortion obeys ``D / (1 + D) >= Gamma(R)``. Book: chapter "The
    phase transition at R*", label ``ch-phase-transition``.

    Examples
    --------
    >>> round(unbiased_bound(4.0), 8)
    0.00785852
    """
    rate = _check_rate(R, "R")
    # np.select evaluates both branches everywhere: the linear one divides
    # by R, harmlessly where it is not selected (and gives inf at R = 0)
    with np.errstate(divide="ignore", over="ignore"):
        return _out(_numeric()["unbiased"](rate), rate)
