"""Closed forms of the book: sympy expressions and the numeric functions
generated from them, and seeded Monte Carlo with ideal test channels.
No kernels, no torch."""

from nqlib.theory import bound, gaussian, montecarlo
from nqlib.theory.bound import gamma, gamma_inv, gap_bits, phi, unbiased_bound

__all__ = [
    "gaussian", "bound", "montecarlo",
    "phi", "gamma", "gamma_inv", "gap_bits", "unbiased_bound",
]
