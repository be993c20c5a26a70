"""The pseudo-random draws a decoder repeats, defined here bit for bit.

A quantized matrix stores a seed, not its rotation or its dither: the decoder
draws them again. Format version 3 therefore draws them with a generator and
transforms that nqlib defines itself, so that a file decodes to the same bits
whatever numpy, LAPACK, libm or CPU reads it:

* **generator**: SplitMix64 (Steele, Lea & Flood 2014) used as a
  counter-based generator: word ``i`` of the stream with key ``k`` is
  ``mix64(k + (i + 1) * 0x9E3779B97F4A7C15) mod 2^64``, where ``mix64`` is the
  SplitMix64 finaliser (shifts, xors and products modulo 2^64: exact integer
  arithmetic). The key is hashed from the seed and the purpose of the
  stream (rotation, dither) with the same finaliser.
* **uniforms**: the top 53 bits of a word times 2^-53 (exact).
* **Gaussians**: Marsaglia's polar method, with a logarithm written here from
  IEEE-754 additions, products, divisions and ``frexp`` only (no libm), so
  every value is the same on every machine.
* **orthogonal matrices**: Gram-Schmidt (twice) on a Gaussian matrix with a
  fixed order of operations (a numba kernel without ``fastmath``), not LAPACK.

What the decoder needs from each draw is listed in :mod:`nqlib.quantizers.matrix`
(dither), :mod:`nqlib.quantizers.hadamard` (signs, odd orthogonal factor) and
:mod:`nqlib.quantizers.entropy` (probability tables, integers from an exp
written here). Files of format version 2 used numpy's ``Generator``
distributions, ``np.linalg.qr`` and ``np.exp``; they are decoded with those
(see ``version`` arguments).

Book: chapter "The practical quantizer", label ``ch-practical``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["FIRST_OWN_DRAWS", "stream_key", "words", "uniforms", "signs",
           "gaussians", "log", "exp_nonpositive", "haar_orthogonal"]

_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK = (1 << 64) - 1

#: the first format version whose draws are defined here (earlier versions
#: used numpy's Generator distributions, np.linalg.qr and np.exp)
FIRST_OWN_DRAWS = 3

#: stream purposes (part of the key)
ROTATION_SIGNS = 0x7369676E     # 'sign'
ROTATION_ODD = 0x6F646466       # 'oddf'
DITHER = 0x64697468             # 'dith'


def _mix64_int(z: int) -> int:
    """The SplitMix64 finaliser on a Python int (mod 2^64)."""
    z &= _MASK
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def stream_key(*parts: int) -> int:
    """64-bit key of a stream from non-negative integers (seed, purpose,
    sizes, ...), each below 2^64: ``h <- mix64(h xor mix64(part + gamma))``
    from ``h = mix64(len(parts))``."""
    h = _mix64_int(len(parts))
    for p in parts:
        p = int(p)
        if not 0 <= p <= _MASK:
            raise ValueError(f"stream key parts must be in [0, 2^64), got {p}")
        h = _mix64_int(h ^ _mix64_int(p + _GAMMA))
    return h


def words(key: int, count: int, start: int = 0) -> np.ndarray:
    """Words ``start .. start + count - 1`` of the stream ``key`` (uint64).

    Word ``i`` is ``mix64(key + (i + 1) * gamma)``: SplitMix64's output
    sequence from state ``key``.
    """
    i = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    z = np.uint64(key) + i * np.uint64(_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


def uniforms(key: int, count: int, start: int = 0) -> np.ndarray:
    """Uniforms on [0, 1): the top 53 bits of each word times 2^-53."""
    return (words(key, count, start) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def signs(key: int, count: int) -> np.ndarray:
    """Random signs (float64 +-1): the top bit of each word."""
    top = (words(key, count) >> np.uint64(63)).astype(np.float64)
    return 1.0 - 2.0 * top


_LN2 = 0.6931471805599453          # float64 nearest to ln 2
#: 1 / (2k + 1), k = 0..12: the series of atanh
_ATANH = tuple(1.0 / (2 * k + 1) for k in range(13))


def log(x) -> np.ndarray:
    """Natural logarithm of positive, finite float64 values, from IEEE
    operations only (identical on every machine; within a few ulp of the
    true value).

    ``x = f 2^e`` with ``f`` in [sqrt(1/2), sqrt(2)) (``frexp``, exact), then
    ``log f = 2 atanh(t)``, ``t = (f - 1) / (f + 1)``, |t| <= 0.172, by its
    series to t^25 (truncation below 1e-20), and ``log x = e ln2 + log f``.
    """
    x = np.asarray(x, dtype=np.float64)
    f, e = np.frexp(x)
    small = f < 0.7071067811865476
    f = np.where(small, 2.0 * f, f)
    e = (e - small).astype(np.float64)
    t = (f - 1.0) / (f + 1.0)
    z = t * t
    poly = np.full_like(t, _ATANH[-1])
    for c in _ATANH[-2::-1]:
        poly = poly * z + c
    return e * _LN2 + 2.0 * (t * poly)


#: 1 / k!, k = 0..16 (correctly rounded: k! is exact in an int)
_EXP = tuple(1 / math.factorial(k) for k in range(17))
#: ln 2 split as in fdlibm: the high part has 32 significant bits, so
#: ``k * _LN2_HI`` is exact for |k| < 2^21
_LN2_HI = float.fromhex("0x1.62e42fee00000p-1")
_LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")


def exp_nonpositive(x) -> np.ndarray:
    """``exp(x)`` for finite ``x <= 0``, from IEEE operations only (identical
    on every machine; relative error below 1e-15). Values below -700 give 0.

    ``x = k ln2 + r`` with integer ``k`` and |r| <= ln2 / 2 (Cody-Waite: the
    high part of ln 2 has few bits, so ``k * ln2_hi`` is exact), ``exp(r)``
    by its Taylor series to r^16 (Horner), then ``ldexp`` (exact).
    """
    x = np.asarray(x, dtype=np.float64)
    if np.any(x > 0) or not np.all(np.isfinite(x)):
        raise ValueError("exp_nonpositive needs finite x <= 0")
    tiny = x < -700.0
    x = np.where(tiny, 0.0, x)
    k = np.floor(x / _LN2 + 0.5)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    poly = np.full_like(r, _EXP[-1])
    for c in _EXP[-2::-1]:
        poly = poly * r + c
    return np.where(tiny, 0.0, np.ldexp(poly, k.astype(np.int32)))


def gaussians(key: int, count: int) -> np.ndarray:
    """``count`` standard normal values (Marsaglia's polar method).

    Pairs ``(u, v)`` uniform on [-1, 1)^2 come from consecutive word pairs;
    a pair with ``0 < s = u^2 + v^2 < 1`` gives ``u sqrt(-2 log(s) / s)`` and
    ``v sqrt(-2 log(s) / s)``; others are skipped. The output is the values
    of the accepted pairs in stream order (:func:`log` and IEEE ``sqrt``:
    the same on every machine).
    """
    out = np.empty(count)
    filled = 0
    start = 0
    while filled < count:
        # pairs per pass: enough for the rest (acceptance pi / 4 > 0.75),
        # at most 2^16 (bounded temporaries)
        pairs = min(1 << 16, max(64, int((count - filled) * 0.66) + 64))
        u = 2.0 * uniforms(key, 2 * pairs, start) - 1.0
        start += 2 * pairs
        a, b = u[0::2], u[1::2]
        s = a * a + b * b
        ok = (s > 0.0) & (s < 1.0)
        a, b, s = a[ok], b[ok], s[ok]
        factor = np.sqrt(-2.0 * log(s) / s)
        vals = np.empty(2 * s.size)
        vals[0::2] = a * factor
        vals[1::2] = b * factor
        take = min(vals.size, count - filled)
        out[filled:filled + take] = vals[:take]
        filled += take
    return out


def haar_orthogonal(key: int, m: int) -> np.ndarray:
    """A Haar-distributed ``m x m`` orthogonal matrix: the ``Q`` factor, with
    a positive diagonal ``R``, of a matrix of :func:`gaussians` (row-major),
    computed by classical Gram-Schmidt applied twice in a fixed order
    (:func:`nqlib.kernels.cpu.linalg.orthonormalize_columns`)."""
    from nqlib.kernels.cpu.linalg import orthonormalize_columns

    Z = gaussians(key, m * m).reshape(m, m)
    out = np.empty((m, m))
    if not orthonormalize_columns(Z, out):
        raise ValueError("the Gaussian matrix of the rotation is singular")
    return out
