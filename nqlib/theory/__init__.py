"""Closed forms of the book: sympy expressions and the numeric functions
generated from them, and seeded Monte Carlo with ideal test channels.
No kernels, no torch.

Submodules: :mod:`~nqlib.theory.bound` (phi, Gamma, R* and their sympy
forms), :mod:`~nqlib.theory.gaussian`, :mod:`~nqlib.theory.montecarlo` and
:mod:`~nqlib.theory.distortion` (the product distortion, numpy only). The
sympy-based ones load on first access, so that ``import nqlib`` stays light.
The constants of the phase transition are computed on first access too:
``R_STAR`` (the critical rate, about 0.906 bit/entry), ``SLOPE`` (the slope of
the tangent from the origin) and ``GAMMA_AT_R_STAR``.

Examples
--------
>>> from nqlib import theory
>>> round(theory.R_STAR, 3)
0.906
>>> round(float(theory.gamma(1.0)), 4)
0.4375
"""

import importlib

from nqlib.theory import distortion
from nqlib.theory.distortion import matmul_distortion

_SUBMODULES = ("bound", "gaussian", "montecarlo")
_FROM_BOUND = ("phi", "gamma", "gamma_inv", "gap_bits", "unbiased_bound",
               "R_STAR", "SLOPE", "GAMMA_AT_R_STAR")

__all__ = ["distortion", "matmul_distortion", *_SUBMODULES, *_FROM_BOUND]


def __getattr__(name):
    # PEP 562: sympy (and the symbolic solutions) load on first access.
    if name in _SUBMODULES:
        return importlib.import_module(f"nqlib.theory.{name}")
    if name in _FROM_BOUND:
        return getattr(importlib.import_module("nqlib.theory.bound"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
