"""Closed forms of the book: sympy expressions and the numeric functions
generated from them, and seeded Monte Carlo with ideal test channels.
No kernels, no torch.

The constants of the phase transition are re-exported here and computed on
first access: ``R_STAR`` (the critical rate, about 0.906 bit/entry),
``SLOPE`` (the slope of the tangent from the origin) and ``GAMMA_AT_R_STAR``.

Examples
--------
>>> from nqlib import theory
>>> round(theory.R_STAR, 3)
0.906
>>> round(float(theory.gamma(1.0)), 4)
0.4375
"""

from nqlib.theory import bound, gaussian, montecarlo
from nqlib.theory.bound import gamma, gamma_inv, gap_bits, phi, unbiased_bound

_CONSTANTS = ("R_STAR", "SLOPE", "GAMMA_AT_R_STAR")

__all__ = [
    "gaussian", "bound", "montecarlo",
    "phi", "gamma", "gamma_inv", "gap_bits", "unbiased_bound",
    *_CONSTANTS,
]


def __getattr__(name):
    # PEP 562: the symbolic constants are solved (sympy) on first access.
    if name in _CONSTANTS:
        return getattr(bound, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_CONSTANTS))
