"""Slow, obviously-correct numpy oracles.

Nothing here imports from nqlib. The fast kernels (numba, Triton) are tested
against these functions: the vectorised Conway--Sloane decoders follow the
same arithmetic contract as the kernels (so answers agree bit for bit), and
the brute-force searches check them in distance.
"""
