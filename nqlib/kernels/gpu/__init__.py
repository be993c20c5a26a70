"""Triton kernels (GPU, or CPU under ``TRITON_INTERPRET=1``), private.

One module per operation, each holding its ``@triton.jit`` kernels and the
launchers that check, allocate and launch them: :mod:`.lattice_triton`
(closest lattice point) and :mod:`.voronoi_triton` (Voronoi encode/decode).
They import torch and triton, so ``import nqlib`` never imports them: the
public API imports them inside its ``backend == "triton"`` branches.

Every kernel follows the arithmetic contract of
:mod:`nqlib.reference.lattices` and returns the same bits as the numba
kernels of :mod:`nqlib.kernels.cpu.lattice`; kernels are launched with
``enable_fp_fusion=False`` so that no multiply-add is contracted into an FMA.
"""
