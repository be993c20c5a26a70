"""The bit layout the fused fixed-mode GPU kernels read.

The host-side builder (:mod:`nqlib.quantizers.fixed_layout`) writes these
fields and the kernels (:mod:`nqlib.kernels.gpu.matmul_triton`) read them,
so they are defined once, here, in a module that imports neither torch nor
triton.

Per vector and per coded 8-block the layout stores the eight halves ``m_j``
(4 bits each in one int32 when every ``q <= 16``, else 8 bits each in two
int32) and one ``meta`` byte, ``pi | odd << 1 | k << 2 | index << 5``: the
parity ``pi`` of ``r + q`` (bit 0), whether the D8 parity fix applies
(bit 1), the coordinate ``k`` it moves (bits 2-4) and the scale index
(bits 5-7). Book: chapter "Kernels: CPU and GPU", label ``ch-kernels``.
"""

__all__ = ["PARITY_SHIFT", "ODD_SHIFT", "FIX_SHIFT", "INDEX_SHIFT",
           "ROW_ALIGN", "TAB_SIZE", "MAX_Q"]

#: Bit of the parity ``pi`` in the ``meta`` byte.
PARITY_SHIFT = 0
#: Bit saying whether the D8 parity fix applies.
ODD_SHIFT = 1
#: First of the three bits of the coordinate ``k`` the fix moves (``meta &
#: 28`` is the shift ``4 k`` of its 4-bit half).
FIX_SHIFT = 2
#: First of the three bits of the scale index (at most 8 scales per part).
INDEX_SHIFT = 5
#: Stored rows are padded to a multiple of this many blocks: Triton then
#: knows the row stride is divisible by 16 and vectorises the loads.
ROW_ALIGN = 16
#: Entries of the scale tables (``tab``, float32; ``betas``, float64): beta
#: for the scales of part hi (0..7) and lo (8..15).
TAB_SIZE = 16
#: Largest nesting ratio ``q`` the layout holds (8-bit halves).
MAX_Q = 256
