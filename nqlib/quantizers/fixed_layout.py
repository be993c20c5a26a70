"""The host-side GPU layout of a fixed-mode weight: numpy arrays.

A fixed-mode :class:`~nqlib.QuantizedMatrix` stores every 8-block of every
rotated, normalised vector as one mixed-radix word of an E8 Voronoi code.
The fused GPU kernels (:mod:`nqlib.kernels.gpu.matmul_triton`) read instead,
per block, the eight *halves* ``m_j`` of the decoder's residuals and one
meta byte (parity, parity fix, scale index; the bit layout is
:mod:`nqlib.kernels.gpu.fixed_format`), from which the decode is exact
integer arithmetic. This module builds those arrays on the host
(:func:`fixed_layout_arrays`): it runs numba's decoder once over every block
and records what it decided (:func:`nqlib.quantizers.cpu_layout.stored_fields`),
so the GPU reproduces numba's output bit for bit, including the ties that
the float64 round-off of ``y / q`` breaks. It also computes the per-vector
constants of the layer epilogue. Nothing here imports torch:
:func:`gpu_layout` uploads the arrays (:func:`nqlib.kernels.gpu.matmul_triton.upload`),
and :func:`decoded_rows` / :func:`dequantized_rows` decode a matrix on the
device; those three import torch and triton when called.

Book: chapter "Kernels: CPU and GPU", label ``ch-kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nqlib.kernels.gpu.fixed_format import (
    FIX_SHIFT,
    INDEX_SHIFT,
    MAX_Q,
    ODD_SHIFT,
    PARITY_SHIFT,
    ROW_ALIGN,
    TAB_SIZE,
)
from nqlib.quantizers.coded_domain import dither, padded, unit_mean_direction
from nqlib.quantizers.cpu_layout import stored_fields
from nqlib.quantizers.fixed_mode import fixed_part_codes
from nqlib.quantizers.matrix import QuantizedMatrix

__all__ = ["FixedLayoutArrays", "fixed_layout_arrays", "pack_layout",
           "rotation_arrays", "gpu_layout", "decoded_rows", "dequantized_rows",
           "LAYOUT_CHUNK"]

#: Vectors decoded per numba call while building a layout (bounds memory).
LAYOUT_CHUNK = 4096


@dataclass(eq=False)
class FixedLayoutArrays:
    """The GPU layout of a fixed-mode matrix as host (numpy) arrays.

    Build with :func:`fixed_layout_arrays` (from a QuantizedMatrix) or
    :func:`pack_layout` (from halves and meta bytes); upload with
    :func:`nqlib.kernels.gpu.matmul_triton.upload`.

    Attributes
    ----------
    shape : tuple of int
        ``(n, a)``: ``a`` vectors of length ``n`` (padded to ``n_pad``).
    n_pad : int
        ``8 B``, ``B`` the blocks per vector.
    h : int
        Blocks ``[0, h)`` belong to part hi, ``[h, coded_blocks)`` to part
        lo; blocks from ``coded_blocks`` on are dropped (decode to 0).
    coded_blocks : int
    stride_b : int
        ``coded_blocks`` rounded up to ``ROW_ALIGN``: blocks per stored row.
    q : tuple of int
        ``(q_hi, q_lo)``; 0 for an absent part.
    code_bits : int
        4 or 8 bits per half ``m_j``.
    words : ndarray of int32, shape (a, stride_b * code_bits // 4)
        The packed halves.
    meta : ndarray of uint8, shape (a, stride_b)
        ``pi | odd << 1 | k << 2 | index << 5`` per block.
    tab : ndarray of float32, shape (TAB_SIZE,)
        The scales of part hi (entries 0..7) and lo (8..15).
    betas : ndarray of float64, shape (TAB_SIZE,)
        The same scales in float64.
    dither : ndarray of float64, shape (a, n_pad), or None
        The dither of a dithered matrix.
    row_scale, row_offset : ndarray of float32, shape (a,), or None
        The per-vector constants of the fused layer (None with dither).
    rotation : tuple or None
        ``(signs, orthogonal, power_of_two)`` of the random Hadamard
        rotation (:func:`rotation_arrays`), or None.
    """

    shape: tuple
    n_pad: int
    h: int
    coded_blocks: int
    stride_b: int
    q: tuple
    code_bits: int
    words: np.ndarray
    meta: np.ndarray
    tab: np.ndarray
    betas: np.ndarray
    dither: np.ndarray | None = None
    row_scale: np.ndarray | None = None
    row_offset: np.ndarray | None = None
    rotation: tuple | None = None


def pack_layout(halves, meta, shape, h, qs, betas, code_bits, *, dither=None,
                row_scale=None, row_offset=None,
                rotation=None) -> FixedLayoutArrays:
    """Pack halves and meta bytes into a :class:`FixedLayoutArrays`.

    Parameters
    ----------
    halves : ndarray of uint8, shape (a, coded, 8)
        The halves ``m_j`` of every coded block.
    meta : ndarray of uint8, shape (a, coded)
        The meta byte of every coded block.
    shape : tuple of int
        ``(n, a)``.
    h : int
        Blocks in part hi.
    qs : dict
        ``{"hi": q_hi, "lo": q_lo}`` for the parts present.
    betas : dict
        The scales of the parts present (float32 values).
    code_bits : {4, 8}
        Bits per stored half.
    dither, row_scale, row_offset, rotation : optional
        Stored as given (see :class:`FixedLayoutArrays`).

    Returns
    -------
    FixedLayoutArrays
        Rows padded with zero blocks to a multiple of ``ROW_ALIGN`` blocks,
        halves packed ``code_bits`` each, and the float32 / float64 scale
        tables of the two parts.
    """
    a, coded = meta.shape
    stride_b = -(-coded // ROW_ALIGN) * ROW_ALIGN
    c = np.zeros((a, stride_b, 8), dtype=np.uint8)
    c[:, :coded] = halves
    m = np.zeros((a, stride_b), dtype=np.uint8)
    m[:, :coded] = meta
    if code_bits == 4:
        packed = np.zeros((a, stride_b), dtype=np.uint32)
        for j in range(8):
            packed |= c[:, :, j].astype(np.uint32) << np.uint32(4 * j)
        words = packed.view(np.int32)
    else:
        words = c.view(np.int32).reshape(a, 2 * stride_b)
    tab = np.zeros(TAB_SIZE, dtype=np.float32)
    betas64 = np.zeros(TAB_SIZE)
    for slot, name in enumerate(("hi", "lo")):
        if name not in qs:
            continue
        b = np.asarray(betas[name], dtype=np.float32)
        tab[8 * slot:8 * slot + len(b)] = b
        betas64[8 * slot:8 * slot + len(b)] = b.astype(np.float64)
    n = shape[0]
    return FixedLayoutArrays(
        shape=tuple(shape), n_pad=padded(n), h=h, coded_blocks=coded,
        stride_b=stride_b, q=(qs.get("hi", 0), qs.get("lo", 0)),
        code_bits=code_bits, words=np.ascontiguousarray(words), meta=m,
        tab=tab, betas=betas64, dither=dither, row_scale=row_scale,
        row_offset=row_offset, rotation=rotation)


def rotation_arrays(P):
    """``(signs, orthogonal, power_of_two)`` of the RandomHadamard ``P``
    (None for None): the form the Triton rotation takes, as numpy arrays.

    Parameters
    ----------
    P : RandomHadamard or None

    Returns
    -------
    tuple or None
    """
    if P is None:
        return None
    return (np.asarray(P.signs), np.asarray(P.orthogonal), int(P.power_of_two))


def fixed_layout_arrays(qm) -> FixedLayoutArrays:
    """The GPU layout of a fixed-mode nested-lattice QuantizedMatrix, on the
    host.

    Parameters
    ----------
    qm : QuantizedMatrix
        ``method="nested"``, ``mode="fixed"``; either part may be absent and
        the low part may be dropped (sketching).

    Returns
    -------
    FixedLayoutArrays
        Halves ``m`` (4 bits each when every ``q <= 16``, else 8), one byte
        per block holding the parity, the parity fix and the scale index,
        per-part scales, and -- without dither -- the per-vector constants of
        the fused layer: ``row_scale = alpha * |a_i| / sqrt(n_pad)`` (1 when
        not normalised) and ``row_offset = mean_i - row_scale * c_i /
        sqrt(n)``, ``c_i = <raw_i, u>``, ``u`` the rotated unit all-ones
        vector (0 when not centred).

    Raises
    ------
    ValueError
        For another method or mode, or ``q > 256``.

    Notes
    -----
    Bytes per weight: ``(4 + 1) / 8`` for q <= 16, ``(8 + 1) / 8`` above,
    times the coded fraction of the blocks, plus 8 bytes per vector (see
    ``GpuLayout.bits_per_weight``). Book: chapter "Kernels: CPU and GPU",
    label ``ch-kernels``.
    """
    if not isinstance(qm, QuantizedMatrix):
        raise ValueError(f"expected a QuantizedMatrix, got {type(qm).__name__}")
    if qm.method != "nested" or qm.mode != "fixed":
        raise ValueError("the GPU layout needs a nested-lattice matrix in fixed "
                         f"mode, got method={qm.method!r}, mode={qm.mode!r}")
    n, a = qm.shape
    n_pad = padded(n)
    B = n_pad // 8
    p = qm.payload
    h = int(p.h)
    parts = [("hi", 0, h), ("lo", h, B)]
    parts = [(name, b0, b1) for name, b0, b1 in parts
             if getattr(p, name).L and b1 > b0]
    coded = max((b1 for _, _, b1 in parts), default=0)
    qs = {name: int(getattr(p, name).q) for name, _, _ in parts}
    if qs and max(qs.values()) > MAX_Q:
        raise ValueError(f"q up to {MAX_Q} is supported, got {max(qs.values())}")
    code_bits = 4 if all(q <= 16 for q in qs.values()) else 8
    halves = np.zeros((a, coded, 8), dtype=np.uint8)
    meta = np.zeros((a, coded), dtype=np.uint8)
    P = qm.rotation()
    # c_i = <raw_i, u>, u the rotated unit all-ones vector (epilogue constant)
    u = unit_mean_direction(P, n, n_pad) if qm.center else np.zeros(n_pad)
    c_dot_u = np.zeros(a)
    for name, b0, b1 in parts:
        part = getattr(p, name)
        q = qs[name]
        per = b1 - b0
        betas = np.asarray(part.betas, dtype=np.float64)
        for v0 in range(0, a, LAYOUT_CHUNK):   # v0 * per * L is a multiple of 8
            v1 = min(a, v0 + LAYOUT_CHUNK)
            codes, index = fixed_part_codes(part, (v1 - v0) * per, v0 * per)
            m, pi, odd, k, r = stored_fields(codes, q)
            halves[v0:v1, b0:b1] = m.reshape(v1 - v0, per, 8)
            meta[v0:v1, b0:b1] = (pi << PARITY_SHIFT | odd << ODD_SHIFT
                                  | k << FIX_SHIFT
                                  | index << INDEX_SHIFT).reshape(v1 - v0, per)
            raw = betas[index][:, None] * (0.5 * r)     # numba's decode, no dither
            c_dot_u[v0:v1] += raw.reshape(v1 - v0, 8 * per) @ u[8 * b0:8 * b1]
    z = row_scale = row_offset = None
    if qm.dither:
        z = np.ascontiguousarray(dither(qm.seed, n_pad, a, a * B, qm.dither_key,
                                        qm.version).reshape(a, n_pad))
    else:
        scale = qm.alpha * qm.row_scales()
        offset = np.zeros(a)
        if qm.center:
            offset = qm.means.astype(np.float64) - scale * c_dot_u / np.sqrt(n)
        row_scale = scale.astype(np.float32)
        row_offset = offset.astype(np.float32)
    betas = {name: getattr(p, name).betas for name in qs}
    return pack_layout(halves, meta, (n, a), h, qs, betas, code_bits, dither=z,
                       row_scale=row_scale, row_offset=row_offset,
                       rotation=rotation_arrays(P))


# ------------------------------------------------ on the device (torch)
def gpu_layout(qm, device=None):
    """The device layout of a fixed-mode nested-lattice QuantizedMatrix:
    :func:`fixed_layout_arrays` uploaded by
    :func:`nqlib.kernels.gpu.matmul_triton.upload`.

    Parameters
    ----------
    qm : QuantizedMatrix
        As for :func:`fixed_layout_arrays`.
    device : torch.device or str, optional
        Where the tensors go (default: CUDA when available, else CPU, for the
        Triton interpreter).

    Returns
    -------
    nqlib.kernels.gpu.matmul_triton.GpuLayout

    Raises
    ------
    ValueError
        As :func:`fixed_layout_arrays`.
    """
    arrays = fixed_layout_arrays(qm)
    from nqlib.kernels.gpu import matmul_triton

    return matmul_triton.upload(arrays, device)


def decoded_rows(qm, layout=None, device=None):
    """``qm.coded_rows()`` computed on the device.

    Parameters
    ----------
    qm : QuantizedMatrix
        Nested, fixed mode.
    layout : GpuLayout, optional
        ``gpu_layout(qm, device)``, built when not given.
    device : torch.device or str, optional
        As for :func:`gpu_layout` (ignored when ``layout`` is given).

    Returns
    -------
    torch.Tensor, shape (a, n_pad), float64
        The raw decode, projected (padding and, when centred, the mean
        direction) and shrunk by ``alpha``, on the layout's device.
    """
    from nqlib.kernels.gpu import matmul_triton

    if layout is None:
        layout = gpu_layout(qm, device)
    return matmul_triton.decoded_rows(layout, center=qm.center, alpha=qm.alpha,
                                      rotation=rotation_arrays(qm.rotation()))


def dequantized_rows(qm, layout=None, device=None):
    """``qm.dequantize().T`` computed on the device.

    Parameters
    ----------
    qm, layout, device :
        As for :func:`decoded_rows`.

    Returns
    -------
    torch.Tensor, shape (a, n), float64
    """
    from nqlib.kernels.gpu import matmul_triton

    if layout is None:
        layout = gpu_layout(qm, device)
    means = qm.means.astype(np.float64) if qm.center else None
    return matmul_triton.dequantized_rows(
        layout, center=qm.center, alpha=qm.alpha,
        rotation=rotation_arrays(qm.rotation()), row_scales=qm.row_scales(),
        means=means)
