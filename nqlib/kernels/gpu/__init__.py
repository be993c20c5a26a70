"""Triton kernels (GPU, or CPU under ``TRITON_INTERPRET=1``), private.

One module per operation, each holding its ``@triton.jit`` kernels and the
launchers that check, allocate and launch them: :mod:`.lattice_triton`
(closest lattice point), :mod:`.voronoi_triton` (Voronoi encode/decode),
:mod:`.hadamard_triton` (the seeded block Walsh-Hadamard rotation) and
:mod:`.matmul_triton` (the fixed-mode weight layout and the fused
decode-in-registers matmul behind :class:`nqlib.nn.QuantLinear`) and
:mod:`.trellis_triton` (the decoder of ``mode="trellis"`` payloads).
They import torch and triton, so ``import nqlib`` never imports them: the
public API imports them inside its ``backend == "triton"`` branches.

Every kernel follows the arithmetic contract of
:mod:`nqlib.reference.lattices` and returns the same bits as the numba
kernels of :mod:`nqlib.kernels.cpu.lattice`; kernels are launched with
``enable_fp_fusion=False`` so that no multiply-add is contracted into an FMA.
"""
