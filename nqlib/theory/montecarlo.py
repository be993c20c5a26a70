"""Seeded Monte Carlo with ideal Gaussian test channels, for the bound chapters.

A rate-distortion code for iid N(0, 1) data at ``R`` bits per entry behaves,
for long blocks, like a *test channel*: a random map ``A -> A_hat`` with
mutual information ``I(A; A_hat) = R`` per entry. Simulating the channel
instead of a code shows what the Shannon limit allows, with no code in the
way. Three channels and schemes are provided, with ``rho = 2^(-2R)``:

* :func:`test_channel`, the MMSE (shrinkage) channel
  ``A_hat = (1 - rho) A + sqrt(rho (1 - rho)) N``. It is the backward channel
  ``A = A_hat + E`` with ``A_hat ~ N(0, 1 - rho)`` and ``E ~ N(0, rho)``
  independent, so ``A_hat = E[A | A_hat]``, the MSE per entry is ``rho`` and
  the product error is ``phi(R) = 2 rho - rho^2``.
* :func:`unbiased_channel`, ``A_hat = A + sqrt(rho / (1 - rho)) N``: the
  same channel rescaled by ``1 / (1 - rho)`` so that ``E[A_hat | A] = A``;
  MSE per entry ``rho / (1 - rho)``, product error
  ``phi(R) / (1 - rho)^2 = 2 rho + 3 rho^2 + ...``.
* :func:`sketch`, time sharing: a shared random rotation of the inner
  dimension, then only ``m`` of the ``n`` rotated coordinates described (at
  ``n R / m`` bits each, through :func:`test_channel`), the others estimated
  by 0. With ``m / n = R / R*`` the product error is ``Gamma(R)``.

Randomness: every function takes a ``numpy.random.Generator`` (or a seed) for
its own noise; the rotation of :func:`sketch` comes from a separate shared
``rotation_seed`` so that the encoders of ``A`` and ``B`` agree on it while
their channel noises stay independent.

Book: chapters "The problem: compressing for the product", label
``ch-problem``, and "The phase transition at R*", label
``ch-phase-transition``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from nqlib import _checks
from nqlib.theory import bound
from nqlib.theory.distortion import matmul_distortion

__all__ = [
    "gaussian_matrices", "test_channel", "unbiased_channel", "sketch_plan",
    "sketch", "matmul_distortion", "distortion_samples", "estimate_distortion",
    "SCHEMES",
]

#: Names accepted by :func:`distortion_samples` and :func:`estimate_distortion`.
SCHEMES = ("zero", "shrinkage", "unbiased", "sketch")


def _generator(rng, name="rng"):
    """A numpy Generator from a Generator or an int seed."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, bool) or not isinstance(rng, (int, np.integer)):
        raise ValueError(
            f"{name} must be a numpy Generator or an int seed, got {rng!r}")
    return np.random.default_rng(int(rng))


def _rate(rate, name="rate", *, positive=False):
    """``rate`` as a finite float >= 0 (> 0 if ``positive``)."""
    if positive:
        return _checks.check_positive(rate, name)
    return _checks.check_real(rate, name, low=0.0)


def _matrix(x, name):
    """``x`` as a finite float64 2-D array."""
    return _checks.as_float_array(x, name, ndim=2, dtype=np.float64)


def gaussian_matrices(n, a, b, seed):
    """Two independent matrices with iid N(0, 1) entries.

    Parameters
    ----------
    n : int
        Inner dimension (rows of both), >= 1.
    a, b : int
        Columns of ``A`` and of ``B``, >= 1.
    seed : int or numpy.random.Generator
        Seed (or generator) of the draw.

    Returns
    -------
    A : ndarray, shape (n, a)
    B : ndarray, shape (n, b)
        float64; the product of interest is ``A.T @ B``.

    Notes
    -----
    Book: chapter "The problem: compressing for the product", label
    ``ch-problem``.
    """
    n = _checks.check_int(n, "n", minimum=1)
    a = _checks.check_int(a, "a", minimum=1)
    b = _checks.check_int(b, "b", minimum=1)
    rng = _generator(seed, "seed")
    return rng.standard_normal((n, a)), rng.standard_normal((n, b))


def test_channel(A, rate, rng):
    """The ideal MMSE (shrinkage) Gaussian test channel at ``rate`` bits/entry.

    Parameters
    ----------
    A : array_like, shape (n, a)
        Data, meant to be iid N(0, 1).
    rate : float
        ``R >= 0``, the mutual information per entry between ``A`` and the
        output.
    rng : numpy.random.Generator or int
        Source of the channel noise.

    Returns
    -------
    ndarray, shape (n, a)
        ``A_hat = (1 - rho) A + sqrt(rho (1 - rho)) N`` with
        ``rho = 2^(-2 rate)`` and ``N`` iid N(0, 1). For N(0, 1) data,
        ``A_hat ~ N(0, 1 - rho)``, ``E[A | A_hat] = A_hat`` and
        ``E (A - A_hat)^2 = rho``: the Gaussian distortion-rate function with
        the MMSE reconstruction. ``rate = 0`` gives ``A_hat = 0``.

    Raises
    ------
    ValueError
        If ``A`` is not a finite 2-D array or ``rate`` is negative or not
        finite.

    Notes
    -----
    Book: chapter "The problem: compressing for the product", label
    ``ch-problem``.
    """
    A = _matrix(A, "A")
    rho = 2.0 ** (-2.0 * _rate(rate))
    noise = _generator(rng).standard_normal(A.shape)
    return (1.0 - rho) * A + math.sqrt(rho * (1.0 - rho)) * noise


test_channel.__test__ = False  # a library function, not a pytest test


def unbiased_channel(A, rate, rng):
    """The ideal unbiased Gaussian test channel at ``rate`` bits/entry.

    Parameters
    ----------
    A : array_like, shape (n, a)
        Data, meant to be iid N(0, 1).
    rate : float
        ``R > 0``, the mutual information per entry between ``A`` and the
        output.
    rng : numpy.random.Generator or int
        Source of the channel noise.

    Returns
    -------
    ndarray, shape (n, a)
        ``A_hat = A + sigma N`` with ``sigma^2 = rho / (1 - rho)``,
        ``rho = 2^(-2 rate)``: the additive-noise channel with
        ``1/2 log2(1 + 1 / sigma^2) = rate``. ``E[A_hat | A] = A`` and the
        MSE per entry is ``rho / (1 - rho)``, more than the MMSE channel's
        ``rho``; it is :func:`test_channel`'s output divided by ``1 - rho``.

    Raises
    ------
    ValueError
        If ``A`` is not a finite 2-D array or ``rate`` is not finite and
        > 0 (at rate 0 no unbiased estimate exists).

    Notes
    -----
    Book: chapter "The problem: compressing for the product", label
    ``ch-problem``.
    """
    A = _matrix(A, "A")
    rho = 2.0 ** (-2.0 * _rate(rate, positive=True))
    noise = _generator(rng).standard_normal(A.shape)
    return A + math.sqrt(rho / (1.0 - rho)) * noise


def sketch_plan(n, rate, point_rate=None):
    """How many rotated coordinates :func:`sketch` keeps, and at what rate.

    Parameters
    ----------
    n : int
        Inner dimension, >= 1.
    rate : float
        Total budget, bits per entry of the n x a matrix, >= 0.
    point_rate : float, optional
        The rate per kept coordinate aimed at; default ``R*``
        (:data:`nqlib.theory.bound.R_STAR`).

    Returns
    -------
    m : int
        Kept coordinates, ``round(n min(1, rate / point_rate))``.
    kept_rate : float
        Bits per kept entry, ``n rate / m`` (0 when ``m = 0``), so that all
        ``n rate`` bits of a column are spent.

    Notes
    -----
    With these, the expected product error of :func:`sketch` on iid
    N(0, 1) data is ``(m / n) phi(kept_rate) + (1 - m / n)``, which is
    ``Gamma(rate)`` when ``m / n = rate / R*`` exactly and slightly above it
    otherwise (a chord of ``phi`` lies above its tangent). Book: chapter
    "The phase transition at R*", label ``ch-phase-transition``.
    """
    n = _checks.check_int(n, "n", minimum=1)
    rate = _rate(rate)
    point_rate = bound.R_STAR if point_rate is None else _rate(
        point_rate, "point_rate", positive=True)
    m = int(round(n * min(1.0, rate / point_rate)))
    if m == 0 and rate > 0:
        m = 1
    return m, (n * rate / m if m else 0.0)


@functools.lru_cache(maxsize=4)
def _haar_rows(n, m, rotation_seed):
    """The first ``m`` rows of a Haar-distributed n x n rotation, shape (m, n).

    Drawn directly as a uniformly random orthonormal m-frame: the QR
    factorisation of an n x m Gaussian matrix, with the signs of R's diagonal
    moved into Q so that the law is exactly Haar (Mezzadri, Notices AMS 54,
    2007). Costs O(n m^2) instead of O(n^3) for the full rotation.
    """
    z = np.random.default_rng(rotation_seed).standard_normal((n, m))
    q, r = np.linalg.qr(z)
    rows = (q * np.where(np.diag(r) < 0, -1.0, 1.0)).T
    rows.setflags(write=False)
    return rows


def sketch(A, rate, rng, *, rotation_seed, point_rate=None):
    """Time sharing: describe only a fraction of randomly rotated coordinates.

    Parameters
    ----------
    A : array_like, shape (n, a)
        Data; the product of interest is ``A.T @ B`` (rotate ``B`` with the
        same ``rotation_seed``).
    rate : float
        Total budget, bits per entry, >= 0.
    rng : numpy.random.Generator or int
        Source of the channel noise (independent for ``A`` and ``B``).
    rotation_seed : int
        The shared seed of the random rotation; encoders of ``A`` and ``B``
        must use the same one.
    point_rate : float, optional
        Rate per kept coordinate aimed at, default ``R*``; see
        :func:`sketch_plan`.

    Returns
    -------
    ndarray, shape (n, a)
        ``A_hat = U^T P test_channel(U A)`` with ``U`` a Haar rotation of the
        inner dimension and ``P`` keeping the first ``m`` rotated rows
        (zeroing the rest), each kept entry described at ``n rate / m`` bits.
        Because ``U`` is orthogonal, ``A_hat^T B_hat`` is the product of the
        kept, described coordinates: the dropped ones contribute 0.

    Raises
    ------
    ValueError
        If ``A`` is not a finite 2-D array, ``rate`` is negative or not
        finite, or ``rotation_seed`` is not an int.

    Notes
    -----
    For iid N(0, 1) data, ``U A`` is again iid N(0, 1) whatever ``U``; the
    rotation is what makes the scheme work for *any* fixed ``A, B`` on
    average over ``U``. Book: chapter "The phase transition at R*", label
    ``ch-phase-transition``.
    """
    A = _matrix(A, "A")
    rotation_seed = _checks.check_int(rotation_seed, "rotation_seed", minimum=0)
    n = A.shape[0]
    m, kept_rate = sketch_plan(n, rate, point_rate)
    if m == 0:
        return np.zeros_like(A)
    kept = _haar_rows(n, m, rotation_seed)  # the first m rows of U
    return kept.T @ test_channel(kept @ A, kept_rate, rng)


def distortion_samples(scheme, n, a, b, rate, *, reps, seed, point_rate=None):
    """Product errors of a scheme on independent replicates.

    Parameters
    ----------
    scheme : {"zero", "shrinkage", "unbiased", "sketch"}
        ``"zero"``: ``C_hat = 0`` (rate ignored). ``"shrinkage"``: both
        matrices through :func:`test_channel`. ``"unbiased"``: both through
        :func:`unbiased_channel`. ``"sketch"``: both through :func:`sketch`
        with one shared rotation per replicate. The decoder outputs
        ``C_hat = A_hat.T @ B_hat``.
    n, a, b : int
        Shapes of ``A`` (n x a) and ``B`` (n x b).
    rate : float
        Bits per entry for each matrix, >= 0 (> 0 for ``"unbiased"``).
    reps : int
        Independent replicates (fresh matrices, noise and rotation), >= 2.
    seed : int
        Seed of the whole experiment, >= 0.
    point_rate : float, optional
        Passed to :func:`sketch`.

    Returns
    -------
    ndarray, shape (reps,)
        :func:`matmul_distortion` of each replicate.

    Notes
    -----
    Replicate ``k`` draws its matrices first from the ``k``-th child of
    ``numpy.random.SeedSequence(seed)``, so the same ``seed``, ``n``, ``a``,
    ``b`` give the *same* matrices for every scheme (common random numbers):
    differences between schemes can be estimated from paired replicates.
    Book: chapter "The phase transition at R*", label
    ``ch-phase-transition``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    reps = _checks.check_int(reps, "reps", minimum=2)
    rate = _rate(rate, positive=scheme == "unbiased")
    seeds = np.random.SeedSequence(_checks.check_int(seed, "seed", minimum=0))
    values = np.empty(reps)
    for k, child in enumerate(seeds.spawn(reps)):
        rng = np.random.default_rng(child)
        A, B = gaussian_matrices(n, a, b, rng)
        if scheme == "zero":
            A_hat, B_hat = np.zeros_like(A), np.zeros_like(B)
        elif scheme == "shrinkage":
            A_hat, B_hat = test_channel(A, rate, rng), test_channel(B, rate, rng)
        elif scheme == "unbiased":
            A_hat = unbiased_channel(A, rate, rng)
            B_hat = unbiased_channel(B, rate, rng)
        else:
            rotation_seed = int(rng.integers(2**63 - 1))
            A_hat = sketch(A, rate, rng, rotation_seed=rotation_seed,
                           point_rate=point_rate)
            B_hat = sketch(B, rate, rng, rotation_seed=rotation_seed,
                           point_rate=point_rate)
        values[k] = matmul_distortion(A, B, A_hat.T @ B_hat)
    return values


def estimate_distortion(scheme, n, a, b, rate, *, reps, seed, point_rate=None):
    """Monte Carlo product error of a scheme, with its standard error.

    Parameters are those of :func:`distortion_samples`.

    Returns
    -------
    mean : float
        Average of :func:`matmul_distortion` over the replicates.
    standard_error : float
        Sample standard deviation of the replicates over ``sqrt(reps)``: the
        replicates are independent, while the ``a b`` entries of one product
        are not, so this is the honest error bar.

    Notes
    -----
    Book: chapters "The problem: compressing for the product", label
    ``ch-problem``, and "The phase transition at R*", label
    ``ch-phase-transition``.
    """
    values = distortion_samples(scheme, n, a, b, rate, reps=reps, seed=seed,
                                point_rate=point_rate)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))
