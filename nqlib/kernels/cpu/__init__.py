"""Numba kernels (CPU). Arrays in, arrays out; no allocation policy, no RNG."""
