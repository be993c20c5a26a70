"""Triton kernels (GPU, or CPU under ``TRITON_INTERPRET=1``), private.

One module per operation, each holding its ``@triton.jit`` kernels and the
launchers that check, allocate and launch them: :mod:`.lattice_triton`
(closest lattice point), :mod:`.voronoi_triton` (Voronoi encode/decode),
:mod:`.hadamard_triton` (the seeded block Walsh-Hadamard rotation),
:mod:`.matmul_triton` (uploads the fixed-mode weight layout and runs the
fused decode-in-registers matmul behind :class:`nqlib.nn.QuantLinear`) and
:mod:`.trellis_triton` (the decoder of ``mode="trellis"`` payloads).
:mod:`.fixed_format` (no torch) holds the bit layout shared with the
host-side builder :mod:`nqlib.quantizers.fixed_layout`.
They import torch and triton, so ``import nqlib`` never imports them: the
public API imports them inside its ``backend == "triton"`` branches.

The kernels are leaves: they take tensors, integers and floats, and import
nothing from :mod:`nqlib` but :mod:`nqlib._backend`, :mod:`nqlib._checks`
and each other. The glue that knows a ``VoronoiCode``, a payload or a
``QuantizedMatrix`` lives above them, in :mod:`nqlib.quantizers`.

Every kernel follows the arithmetic contract of
:mod:`nqlib.reference.lattices` and returns the same bits as the numba
kernels of :mod:`nqlib.kernels.cpu.lattice`; kernels are launched with
``enable_fp_fusion=False`` so that no multiply-add is contracted into an FMA.
"""
