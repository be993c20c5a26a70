"""Closed forms of the book: sympy expressions and the numeric functions
generated from them. No kernels, no torch."""

from nqlib.theory import gaussian

__all__ = ["gaussian"]
