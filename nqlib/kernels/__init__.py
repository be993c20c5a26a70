"""Compiled kernels: leaves of the package, called only by the public layers.

``kernels.cpu`` holds numba kernels, ``kernels.gpu`` torch + Triton ones.
Neither is imported by ``import nqlib``.
"""
