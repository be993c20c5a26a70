"""The Gaussian distortion-rate function and the gap in bits.

Kept symbolic so that chapters can display and manipulate the formulas; the
numeric versions are generated with :func:`sympy.lambdify`, never re-typed.

Book: chapter "Quantizing one Gaussian vector", label ``ch-rate-distortion``.
"""

import numpy as np
import sympy as sp

R, D, sigma2 = sp.symbols("R D sigma2", positive=True)

#: Distortion-rate function of a memoryless Gaussian source,
#: D(R) = sigma^2 2^(-2R) (mean squared error per entry at R bits per entry).
distortion_rate = sigma2 * 2 ** (-2 * R)

#: Its inverse, the rate-distortion function R(D) = 1/2 log2(sigma^2 / D),
#: obtained by sympy rather than typed.
rate_distortion = sp.solve(sp.Eq(distortion_rate, D), R)[0]

_distortion_rate_np = sp.lambdify((R, sigma2), distortion_rate, "numpy")
_rate_distortion_np = sp.lambdify((D, sigma2), rate_distortion, "numpy")


def gaussian_distortion(rate_bits, variance=1.0):
    """Smallest MSE per entry at ``rate_bits`` for iid N(0, variance) data.

    Parameters
    ----------
    rate_bits : float or ndarray
        Rate in bits per entry, >= 0.
    variance : float
        Source variance sigma^2 > 0.

    Returns
    -------
    float or ndarray
        ``variance * 2**(-2 * rate_bits)``.
    """
    rate_bits = np.asarray(rate_bits, dtype=np.float64)
    if np.any(~np.isfinite(rate_bits)) or np.any(rate_bits < 0):
        raise ValueError("rate_bits must be finite and >= 0")
    if not (np.isfinite(variance) and variance > 0):
        raise ValueError(f"variance must be finite and > 0, got {variance}")
    out = _distortion_rate_np(rate_bits, float(variance))
    return float(out) if np.ndim(out) == 0 else out


def gaussian_rate(mse_per_entry, variance=1.0):
    """Fewest bits per entry reaching ``mse_per_entry`` on N(0, variance) data.

    Returns ``max(0, 1/2 log2(variance / mse_per_entry))``.
    """
    mse = np.asarray(mse_per_entry, dtype=np.float64)
    if np.any(~np.isfinite(mse)) or np.any(mse <= 0):
        raise ValueError("mse_per_entry must be finite and > 0")
    out = np.maximum(0.0, _rate_distortion_np(mse, float(variance)))
    return float(out) if np.ndim(out) == 0 else out


def gap_bits_vector(rate_bits, mse_per_entry, variance=1.0):
    """Distance in bits from the Gaussian bound: ``R - R(D)``.

    A scheme that spends ``rate_bits`` per entry to reach ``mse_per_entry``
    would need only ``gaussian_rate(mse_per_entry)`` bits if it were optimal.
    """
    return np.asarray(rate_bits) - gaussian_rate(mse_per_entry, variance)


def ecsq_rate_distortion(step, variance=1.0, *, centroid=True):
    """Ideal entropy-coded uniform scalar quantizer on N(0, variance).

    The quantizer maps x to the index k = floor(x / step + 1/2) (cells of
    width ``step`` centred on multiples of ``step``). Its rate is the entropy
    H(k) of the index, which an ideal entropy coder reaches; its MSE is
    computed exactly from the Gaussian cell probabilities, with either the
    cell centroid (the MMSE reconstruction) or the cell centre.

    Parameters
    ----------
    step : float or ndarray
        Cell width(s), > 0.
    variance : float
        Source variance.
    centroid : bool
        Reconstruct at the conditional mean (True) or the cell centre.

    Returns
    -------
    rate_bits, mse_per_entry : float or ndarray
        Entropy in bits and mean squared error per entry.
    """
    from scipy.special import ndtr

    step_arr = np.atleast_1d(np.asarray(step, dtype=np.float64))
    if np.any(~np.isfinite(step_arr)) or np.any(step_arr <= 0):
        raise ValueError("step must be finite and > 0")
    sigma = float(np.sqrt(variance))
    rates, mses = [], []
    for s in step_arr / sigma:
        kmax = int(np.ceil(9.0 / s)) + 1
        k = np.arange(-kmax, kmax + 1, dtype=np.float64)
        lo, hi = (k - 0.5) * s, (k + 0.5) * s
        pdf_lo = np.exp(-lo**2 / 2) / np.sqrt(2 * np.pi)
        pdf_hi = np.exp(-hi**2 / 2) / np.sqrt(2 * np.pi)
        p = ndtr(hi) - ndtr(lo)
        m1 = pdf_lo - pdf_hi                       # int x phi(x) dx over the cell
        m2 = p + lo * pdf_lo - hi * pdf_hi         # int x^2 phi(x) dx
        keep = p > 0
        p, m1, m2, c = p[keep], m1[keep], m2[keep], (k * s)[keep]
        rates.append(float(-(p * np.log2(p)).sum()))
        if centroid:
            mses.append(float((m2 - m1**2 / p).sum()))
        else:
            mses.append(float((m2 - 2 * c * m1 + c**2 * p).sum()))
    rates = np.array(rates)
    mses = np.array(mses) * variance
    if np.ndim(step) == 0:
        return float(rates[0]), float(mses[0])
    return rates, mses
