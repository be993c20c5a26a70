"""Fused decode-matmul for fixed-mode nested-lattice weights (Triton).

A fixed-mode :class:`~nqlib.QuantizedMatrix` stores every 8-block of every
rotated, normalised vector as one word ``index * q^8 + sum_j c_j q^j``: the
codes ``c`` (8 integers in [0, q)) of an E8 Voronoi code and the index of its
scale ``beta``. The raw decode of a block (no dither) is

    y = G c,    w = y / q,    out = beta * (y - q Q(w)),

with ``Q`` the nearest point of E8 = D8 ∪ (D8 + 1/2) and ``G`` the basis of
:func:`nqlib.lattices.E8`. This module computes ``x_rot @ W.T`` where the
rows of ``W`` are those decoded vectors, **without writing W anywhere**:
each program decodes a tile of blocks in registers and multiplies it into
its accumulator.

Integer form of the decoder
---------------------------
With ``Y = 2y`` (an integer vector) and ``D = 2q``, the nearest point of the
coset ``D8 + s/2`` (``s`` in {0, 1}) has coordinates ``f_j + s/2`` with
``f_j = floor((Y_j - qs + q) / D)``, and the decoder's output is
``beta * r / 2`` with ``r_j = Y_j - qs - D f_j`` -- small integers, exact in
float32. The D8 rule then moves one coordinate by ``-+D`` when ``sum f`` is
odd, and E8 keeps the nearer coset.

Decisions recorded at layout time
---------------------------------
The library's decoders (numpy, numba, Triton) work in float64 on
``w = fl(y / q)``. For odd ``q`` that quotient is inexact, and whenever two
coordinates have equal rounding errors, or the two cosets are equally near
(``w`` on a face of the Voronoi cell of E8: the code word is on the
boundary of the coarse cell), the *round-off* of ``fl(y / q)`` decides.
Against an exact integer decoder with the same tie rules, numba differs on
25 % of random codes at q = 3, 7.7 % at q = 13 and 0.5 % at q = 197 (never
when q is a power of two, where ``y / q`` is exact), and on 3 % of the
blocks of a real 4-bit matrix (q = 13); each time the two answers differ by
a coarse-lattice vector ``q (u - u')``, not by a rounding error.
Reproducing float64 round-off on the GPU would need float64 arithmetic
(half-rate on an H100, 1/64 on most other GPUs) including ``div.rn.f64``.
Instead :func:`gpu_layout` runs the numba decoder once and records its
decisions per block: the coset ``s``, the coordinate ``k`` that the parity
fix moved and the direction of the move. They fill the unused bits of the
scale-index byte, so the GPU decode is exact integer arithmetic with no
search and no comparison of distances, and equals numba's bit for bit
(``beta * r / 2`` is exact in float64; float32 results are its rounding).

Kernels
-------
``_decode_gemv_kernel`` (one row of activations per program),
``_decode_matmul_kernel`` (``BLOCK_M`` rows: FMAs on a 3-D accumulator, or
one ``tl.dot`` per coordinate) and ``_decode_rows_kernel`` (decode to
memory, for :func:`nqlib.matmul`). The activations are passed
coordinate-major, ``x[m, j, b] = x_rot[m, 8b + j]``, so that ``x_j`` of
consecutive blocks is contiguous. In the FMA kernels the parity fix is not
applied to the weights but added as ``delta * x_k`` per block.

FMAs or ``tl.dot``: a ``tl.dot`` tile has at least 16 rows, so for one to
four rows of activations it would spend 4-16 times the multiply-adds
needed; those cases use FMAs on a register accumulator that is reduced once
after the K loop. From five rows on, one ``tl.dot`` per coordinate
multiplies the decoded ``[BLOCK_N, BLOCK_B]`` weights into the
accumulator, in float32 (``"ieee"``, on the FMA units) by default or on the
tensor cores (``"tf32"``). The thresholds come from the instruction counts
of the compiled loops (:func:`loop_instruction_counts`).

Layout (per vector, per coded block)
------------------------------------
* ``words``: the 8 codes, 4 bits each in one int32 when ``q <= 16``, else
  8 bits each in two int32 -- 4 or 8 bytes per block;
* ``meta``: one uint8, ``index | s << 3 | k << 4 | down << 7`` (index < 8
  scales; ``down``: the fix lowers ``r_k`` by ``D``);
* per part (``hi``: blocks ``[0, h)``, ``lo``: ``[h, B)``): ``q`` and the
  scales; dropped blocks (``L_lo = 0``, sketching) are not stored and not
  visited. Rows are padded with zero blocks to a multiple of
  ``ROW_ALIGN`` = 16 blocks (aligned, vectorised loads).

So a weight costs 5/8 byte (q <= 16) or 9/8 byte: 5 or 9 bits, against the
file's ``bits_per_entry`` (4.02 at rate 4, whose 32-bit words pack
``5 * 13^8`` values into 31.9 bits). :attr:`GpuLayout.bits_per_weight`
reports the exact figure, per-row constants included.

Book: chapter "Kernels: CPU and GPU", label ``ch-kernels``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from nqlib.kernels.gpu.lattice_triton import check_rows

#: Bit fields of the ``meta`` byte: scale index (bits 0-2), coset s
#: (bit 3), coordinate k moved by the parity fix (bits 4-6), direction of
#: the move (bit 7: 1 when r_k goes down by D, i.e. f_k goes up).
COSET_SHIFT = 3
FIX_SHIFT = 4
DIR_SHIFT = 7
_COSET_SHIFT = tl.constexpr(COSET_SHIFT)
_FIX_SHIFT = tl.constexpr(FIX_SHIFT)
_DIR_SHIFT = tl.constexpr(DIR_SHIFT)
#: Stored rows are padded to a multiple of this many blocks: Triton then
#: knows the row stride is divisible by 16 and vectorises the loads.
ROW_ALIGN = 16
#: Entries of the float32 ``tab`` tensor of a launch: beta / 2 for the
#: scales of part hi (0..7) and lo (8..15), then 1 / D and (q + 1/2) / D for
#: hi and lo (16..19).
TAB_HALF_BETA = tl.constexpr(0)
TAB_INV_D = tl.constexpr(16)
TAB_OFFSET = tl.constexpr(18)
#: Vectors decoded per numba call while building a layout (bounds memory).
LAYOUT_CHUNK = 4096
#: tl.dot precisions accepted by :func:`decode_matmul`.
PRECISIONS = ("ieee", "tf32", "tf32x3")


# ------------------------------------------------------------ the decoder
@triton.jit
def _codes(words_ptr, blk_off, mask, CODE_BITS: tl.constexpr):
    """The 8 codes of every block of a tile, as float32 tensors."""
    if CODE_BITS == 4:
        w = tl.load(words_ptr + blk_off, mask=mask, other=0)
        c0 = w & 15
        c1 = (w >> 4) & 15
        c2 = (w >> 8) & 15
        c3 = (w >> 12) & 15
        c4 = (w >> 16) & 15
        c5 = (w >> 20) & 15
        c6 = (w >> 24) & 15
        c7 = (w >> 28) & 15
    else:
        lo = tl.load(words_ptr + 2 * blk_off, mask=mask, other=0)
        hi = tl.load(words_ptr + 2 * blk_off + 1, mask=mask, other=0)
        c0 = lo & 255
        c1 = (lo >> 8) & 255
        c2 = (lo >> 16) & 255
        c3 = (lo >> 24) & 255
        c4 = hi & 255
        c5 = (hi >> 8) & 255
        c6 = (hi >> 16) & 255
        c7 = (hi >> 24) & 255
    return (c0.to(tl.float32), c1.to(tl.float32), c2.to(tl.float32),
            c3.to(tl.float32), c4.to(tl.float32), c5.to(tl.float32),
            c6.to(tl.float32), c7.to(tl.float32))


@triton.jit
def _residual(a, inv_d, offset, d):
    """``f = floor((a + q) / D)`` and ``r = a - D f`` for ``a = Y_j - q s``.

    ``(a + q + 1/2) / D`` lies at least ``1/(2D)`` from every integer, far
    more than the float32 error of one fma, so the floor is exact; ``a``,
    ``f`` and ``r`` are small integers, exact in float32.
    """
    f = tl.floor(tl.fma(a, inv_d, offset))
    return f, a - d * f


@triton.jit
def _decode_tile(words_ptr, meta_ptr, tab_ptr, blk_off, blk, mask, H, q_hi,
                 q_lo, CODE_BITS: tl.constexpr):
    """Decode a [vectors, blocks] tile: the residuals ``r_0..r_7`` *before*
    the parity fix (the output is ``beta r / 2``), the fix ``delta`` to add
    to ``r_k`` (0 for an even block), ``k``, and each block's entry of
    ``tab`` (part * 8 + scale index)."""
    meta = tl.load(meta_ptr + blk_off, mask=mask, other=0).to(tl.int32)
    lo = (blk >= H)[None, :]                   # part lo: blocks h .. B-1
    q = tl.where(lo, q_lo, q_hi)
    d = (2 * q).to(tl.float32)
    inv_d = tl.where(lo, tl.load(tab_ptr + TAB_INV_D + 1),
                     tl.load(tab_ptr + TAB_INV_D))
    offset = tl.where(lo, tl.load(tab_ptr + TAB_OFFSET + 1),
                      tl.load(tab_ptr + TAB_OFFSET))
    s = (meta >> _COSET_SHIFT) & 1             # coset D8 + s/2
    k = (meta >> _FIX_SHIFT) & 7               # coordinate the fix moves
    down = ((meta >> _DIR_SHIFT) & 1) == 1     # it moves r_k down by D
    scale_at = (meta & 7) + tl.where(lo, 8, 0)
    c0, c1, c2, c3, c4, c5, c6, c7 = _codes(words_ptr, blk_off, mask, CODE_BITS)
    # a = Y - q s with Y = 2 G c for the basis of nqlib.lattices.E8:
    # Y_0 = 4c_0 - 2c_1 + c_7, Y_j = 2(c_j - c_(j+1)) + c_7 (j = 1..5),
    # Y_6 = 2c_6 + c_7, Y_7 = c_7
    base = c7 - (q * s).to(tl.float32)
    f0, r0 = _residual(2.0 * (2.0 * c0 - c1) + base, inv_d, offset, d)
    f1, r1 = _residual(2.0 * (c1 - c2) + base, inv_d, offset, d)
    f2, r2 = _residual(2.0 * (c2 - c3) + base, inv_d, offset, d)
    f3, r3 = _residual(2.0 * (c3 - c4) + base, inv_d, offset, d)
    f4, r4 = _residual(2.0 * (c4 - c5) + base, inv_d, offset, d)
    f5, r5 = _residual(2.0 * (c5 - c6) + base, inv_d, offset, d)
    f6, r6 = _residual(2.0 * c6 + base, inv_d, offset, d)
    f7, r7 = _residual(base, inv_d, offset, d)
    fsum = ((f0 + f1) + (f2 + f3)) + ((f4 + f5) + (f6 + f7))      # exact
    odd = (fsum.to(tl.int32) & 1) == 1
    # D8 parity fix: f_k moves one step towards w (down: f_k + 1, r_k - D)
    delta = tl.where(odd, tl.where(down, -d, d), 0.0)
    return r0, r1, r2, r3, r4, r5, r6, r7, delta, k, scale_at


@triton.jit
def _fixed(r, j: tl.constexpr, k, delta):
    """Coordinate ``j`` of the residuals after the parity fix."""
    return tl.where(k == j, r + delta, r)


# --------------------------------------------------------- fused matmul
@triton.jit
def _decode_gemv_kernel(
    x_ptr,          # (M, 8, >= BC) float32: rotated inputs, coordinate-major:
                    # x[m, j, b] = x_rot[m, 8b + j]; strides stride_xm, stride_xj
    words_ptr,      # (N, stride_b * CODE_BITS / 4) int32: packed codes
    meta_ptr,       # (N, stride_b) uint8: index | s << 3 | k << 4 | down << 7
    tab_ptr,        # (20,) float32: beta/2 per part and scale, 1/D, (q+1/2)/D
    out_ptr,        # (M, N) float32, row stride stride_om
    xsum_ptr,       # (M,) float32: row sums of the unrotated inputs (EPILOGUE)
    scale_ptr,      # (N,) float32: per-vector scale (EPILOGUE)
    offset_ptr,     # (N,) float32: per-vector coefficient of xsum (EPILOGUE)
    bias_ptr,       # (N,) float32 (HAS_BIAS)
    M, N,           # rows of x, vectors of W
    stride_b,       # blocks per stored row: the coded blocks, then zero
                    # blocks up to a multiple of 16 (the K loop runs over all)
    H,              # blocks in part hi
    q_hi, q_lo,     # nesting ratios of the two parts
    stride_xm, stride_xj, stride_om,
    CODE_BITS: tl.constexpr,    # 4 (q <= 16) or 8 bits per code
    BLOCK_N: tl.constexpr,      # vectors per program
    BLOCK_B: tl.constexpr,      # 8-blocks per K step (K tile = 8 BLOCK_B)
    EPILOGUE: tl.constexpr,     # out = scale acc + xsum offset (+ bias)
    HAS_BIAS: tl.constexpr,
):
    # one row of x per program (axis 1): every tensor is 2-D [vectors,
    # blocks] in one register layout, so the loop needs no shared memory
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_row = x_ptr + tl.program_id(1).to(tl.int64) * stride_xm
    n_ok = rn < N
    # one partial sum per (vector, block lane), reduced once after the loop
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    for b0 in range(0, stride_b, BLOCK_B):
        # stride_b is a multiple of 16, so the block mask is constant over
        # runs of 16 blocks and the loads below are vectorised
        blk = b0 + tl.arange(0, BLOCK_B)
        b_ok = blk < stride_b
        w_mask = n_ok[:, None] & b_ok[None, :]
        blk_off = rn[:, None] * stride_b + blk[None, :]
        r0, r1, r2, r3, r4, r5, r6, r7, delta, k, scale_at = _decode_tile(
            words_ptr, meta_ptr, tab_ptr, blk_off, blk, w_mask, H, q_hi, q_lo,
            CODE_BITS)
        hb = tl.load(tab_ptr + TAB_HALF_BETA + scale_at, mask=w_mask, other=0.0)
        # <x_block, r_block> with the unfixed residuals, plus the parity fix
        # as delta * x_k, times the scale beta / 2
        xb = x_row + blk
        x0 = tl.load(xb, mask=b_ok, other=0.0)[None, :]
        x1 = tl.load(xb + stride_xj, mask=b_ok, other=0.0)[None, :]
        x2 = tl.load(xb + 2 * stride_xj, mask=b_ok, other=0.0)[None, :]
        x3 = tl.load(xb + 3 * stride_xj, mask=b_ok, other=0.0)[None, :]
        x4 = tl.load(xb + 4 * stride_xj, mask=b_ok, other=0.0)[None, :]
        x5 = tl.load(xb + 5 * stride_xj, mask=b_ok, other=0.0)[None, :]
        x6 = tl.load(xb + 6 * stride_xj, mask=b_ok, other=0.0)[None, :]
        x7 = tl.load(xb + 7 * stride_xj, mask=b_ok, other=0.0)[None, :]
        s = ((x0 * r0 + x1 * r1) + (x2 * r2 + x3 * r3)) + (
            (x4 * r4 + x5 * r5) + (x6 * r6 + x7 * r7))
        s += _select8(k, x0, x1, x2, x3, x4, x5, x6, x7) * delta
        acc += s * hb
    out = tl.sum(acc, axis=1)
    if EPILOGUE:
        scale = tl.load(scale_ptr + rn, mask=n_ok, other=0.0)
        offset = tl.load(offset_ptr + rn, mask=n_ok, other=0.0)
        out = out * scale + tl.load(xsum_ptr + tl.program_id(1)) * offset
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)
    o_ptrs = out_ptr + tl.program_id(1).to(tl.int64) * stride_om + rn
    tl.store(o_ptrs, out, mask=n_ok)


@triton.jit
def _select8(k, x0, x1, x2, x3, x4, x5, x6, x7):
    """``x_k`` for every block (``k`` in 0..7)."""
    lo = tl.where(k < 2, tl.where(k == 0, x0, x1), tl.where(k == 2, x2, x3))
    hi = tl.where(k < 6, tl.where(k == 4, x4, x5), tl.where(k == 6, x6, x7))
    return tl.where(k < 4, lo, hi)


@triton.jit
def _dot_coordinate(acc, x_ptrs, x_mask, r, j: tl.constexpr, stride_xj, k,
                    delta, hb, PRECISION: tl.constexpr):
    """``acc += x_j @ w_j.T`` with ``w_j = (beta / 2) r_j`` after the fix."""
    xj = tl.load(x_ptrs + j * stride_xj, mask=x_mask, other=0.0)  # [BM, BB]
    w = _fixed(r, j, k, delta) * hb                               # [BN, BB]
    return tl.dot(xj, tl.trans(w), acc, input_precision=PRECISION)


@triton.jit
def _decode_matmul_kernel(
    x_ptr,          # (M, 8, >= BC) float32: rotated inputs, coordinate-major:
                    # x[m, j, b] = x_rot[m, 8b + j]; strides stride_xm, stride_xj
    words_ptr,      # (N, stride_b * CODE_BITS / 4) int32: packed codes
    meta_ptr,       # (N, stride_b) uint8: index | s << 3 | k << 4 | down << 7
    tab_ptr,        # (20,) float32: beta/2 per part and scale, 1/D, (q+1/2)/D
    out_ptr,        # (M, N) float32, row stride stride_om
    xsum_ptr,       # (M,) float32: row sums of the unrotated inputs (EPILOGUE)
    scale_ptr,      # (N,) float32: per-vector scale (EPILOGUE)
    offset_ptr,     # (N,) float32: per-vector coefficient of xsum (EPILOGUE)
    bias_ptr,       # (N,) float32 (HAS_BIAS)
    M, N,           # rows of x, vectors of W
    stride_b,       # blocks per stored row: the coded blocks, then zero
                    # blocks up to a multiple of 16 (the K loop runs over all)
    H,              # blocks in part hi
    q_hi, q_lo,     # nesting ratios of the two parts
    stride_xm, stride_xj, stride_om,
    CODE_BITS: tl.constexpr,    # 4 (q <= 16) or 8 bits per code
    BLOCK_M: tl.constexpr,      # rows of x per program
    BLOCK_N: tl.constexpr,      # vectors per program
    BLOCK_B: tl.constexpr,      # 8-blocks per K step (K tile = 8 BLOCK_B)
    USE_DOT: tl.constexpr,      # tl.dot per coordinate, else FMAs
    PRECISION: tl.constexpr,    # tl.dot input precision
    EPILOGUE: tl.constexpr,     # out = scale acc + xsum offset (+ bias)
    HAS_BIAS: tl.constexpr,
):
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        # one partial sum per (row, vector, block lane), reduced once after
        # the K loop: the loop itself is FMAs, with no cross-thread traffic
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_B], dtype=tl.float32)
    for b0 in range(0, stride_b, BLOCK_B):
        # stride_b is a multiple of 16, so the block mask is constant over
        # runs of 16 blocks and the loads below are vectorised
        blk = b0 + tl.arange(0, BLOCK_B)
        b_ok = blk < stride_b
        w_mask = n_ok[:, None] & b_ok[None, :]
        blk_off = rn[:, None] * stride_b + blk[None, :]
        r0, r1, r2, r3, r4, r5, r6, r7, delta, k, scale_at = _decode_tile(
            words_ptr, meta_ptr, tab_ptr, blk_off, blk, w_mask, H, q_hi, q_lo,
            CODE_BITS)
        hb = tl.load(tab_ptr + TAB_HALF_BETA + scale_at, mask=w_mask, other=0.0)
        x_ptrs = x_ptr + rm[:, None] * stride_xm + blk[None, :]
        x_mask = m_ok[:, None] & b_ok[None, :]
        if USE_DOT:
            acc = _dot_coordinate(acc, x_ptrs, x_mask, r0, 0, stride_xj, k,
                                  delta, hb, PRECISION)
            acc = _dot_coordinate(acc, x_ptrs, x_mask, r1, 1, stride_xj, k,
                                  delta, hb, PRECISION)
            acc = _dot_coordinate(acc, x_ptrs, x_mask, r2, 2, stride_xj, k,
                                  delta, hb, PRECISION)
            acc = _dot_coordinate(acc, x_ptrs, x_mask, r3, 3, stride_xj, k,
                                  delta, hb, PRECISION)
            acc = _dot_coordinate(acc, x_ptrs, x_mask, r4, 4, stride_xj, k,
                                  delta, hb, PRECISION)
            acc = _dot_coordinate(acc, x_ptrs, x_mask, r5, 5, stride_xj, k,
                                  delta, hb, PRECISION)
            acc = _dot_coordinate(acc, x_ptrs, x_mask, r6, 6, stride_xj, k,
                                  delta, hb, PRECISION)
            acc = _dot_coordinate(acc, x_ptrs, x_mask, r7, 7, stride_xj, k,
                                  delta, hb, PRECISION)
        else:
            # <x_block, r_block> with the unfixed residuals, plus the parity
            # fix as delta * x_k, times beta / 2 (as in the GEMV kernel)
            x0 = tl.load(x_ptrs, mask=x_mask, other=0.0)[:, None, :]
            x1 = tl.load(x_ptrs + stride_xj, mask=x_mask, other=0.0)[:, None, :]
            x2 = tl.load(x_ptrs + 2 * stride_xj, mask=x_mask, other=0.0)[:, None, :]
            x3 = tl.load(x_ptrs + 3 * stride_xj, mask=x_mask, other=0.0)[:, None, :]
            x4 = tl.load(x_ptrs + 4 * stride_xj, mask=x_mask, other=0.0)[:, None, :]
            x5 = tl.load(x_ptrs + 5 * stride_xj, mask=x_mask, other=0.0)[:, None, :]
            x6 = tl.load(x_ptrs + 6 * stride_xj, mask=x_mask, other=0.0)[:, None, :]
            x7 = tl.load(x_ptrs + 7 * stride_xj, mask=x_mask, other=0.0)[:, None, :]
            s = ((x0 * r0[None] + x1 * r1[None]) + (x2 * r2[None] + x3 * r3[None])) + (
                (x4 * r4[None] + x5 * r5[None]) + (x6 * r6[None] + x7 * r7[None]))
            xk = _select8(k[None], x0, x1, x2, x3, x4, x5, x6, x7)
            s += xk * delta[None]
            acc += s * hb[None]
    if USE_DOT:
        out = acc
    else:
        out = tl.sum(acc, axis=2)
    if EPILOGUE:
        scale = tl.load(scale_ptr + rn, mask=n_ok, other=0.0)
        offset = tl.load(offset_ptr + rn, mask=n_ok, other=0.0)
        xsum = tl.load(xsum_ptr + rm, mask=m_ok, other=0.0)
        out = out * scale[None, :] + xsum[:, None] * offset[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(o_ptrs, out, mask=m_ok[:, None] & n_ok[None, :])


# ------------------------------------------------------ decode to memory
@triton.jit
def _store_coordinate(out_ptrs, z_ptrs, mask, r, j: tl.constexpr, k, delta,
                      beta, HAS_DITHER: tl.constexpr):
    """``beta * (r / 2 - z)`` in float64, as the numba decoder computes it
    (``r / 2 = y - q Q(y / q)`` exactly)."""
    v = _fixed(r, j, k, delta).to(tl.float64) * 0.5
    if HAS_DITHER:
        v = v - tl.load(z_ptrs + j, mask=mask, other=0.0)
    v = beta * v
    tl.store(out_ptrs + j, v.to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _decode_rows_kernel(
    words_ptr,      # (N, stride_b * CODE_BITS / 4) int32: packed codes
    meta_ptr,       # (N, stride_b) uint8: index | s << 3 | k << 4 | down << 7
    tab_ptr,        # (20,) float32: as for the matmul kernel
    beta_ptr,       # (16,) float64: beta per part and scale
    z_ptr,          # (N, 8 B) float64: dither (HAS_DITHER)
    out_ptr,        # (N, 8 B) float32 or float64, row-major
    N, BC, stride_b, H, q_hi, q_lo,
    row_len,        # 8 B: length of a decoded vector (padded)
    CODE_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    HAS_DITHER: tl.constexpr,
):
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    blk = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (rn < N)[:, None] & (blk < BC)[None, :]
    blk_off = rn[:, None] * stride_b + blk[None, :]
    r0, r1, r2, r3, r4, r5, r6, r7, delta, k, scale_at = _decode_tile(
        words_ptr, meta_ptr, tab_ptr, blk_off, blk, mask, H, q_hi, q_lo,
        CODE_BITS)
    beta = tl.load(beta_ptr + scale_at, mask=mask, other=0.0)
    offs = rn[:, None] * row_len + blk[None, :] * 8
    out_ptrs = out_ptr + offs
    z_ptrs = z_ptr + offs
    _store_coordinate(out_ptrs, z_ptrs, mask, r0, 0, k, delta, beta, HAS_DITHER)
    _store_coordinate(out_ptrs, z_ptrs, mask, r1, 1, k, delta, beta, HAS_DITHER)
    _store_coordinate(out_ptrs, z_ptrs, mask, r2, 2, k, delta, beta, HAS_DITHER)
    _store_coordinate(out_ptrs, z_ptrs, mask, r3, 3, k, delta, beta, HAS_DITHER)
    _store_coordinate(out_ptrs, z_ptrs, mask, r4, 4, k, delta, beta, HAS_DITHER)
    _store_coordinate(out_ptrs, z_ptrs, mask, r5, 5, k, delta, beta, HAS_DITHER)
    _store_coordinate(out_ptrs, z_ptrs, mask, r6, 6, k, delta, beta, HAS_DITHER)
    _store_coordinate(out_ptrs, z_ptrs, mask, r7, 7, k, delta, beta, HAS_DITHER)


# ---------------------------------------------------------------- layout
@dataclass(eq=False)
class GpuLayout:
    """Device tensors of a fixed-mode QuantizedMatrix, for the kernels here.

    Build with :func:`gpu_layout`. ``shape = (n, a)`` is the matrix's shape:
    ``a`` vectors of length ``n`` (padded to ``n_pad = 8 B``). Blocks
    ``[0, h)`` of every vector belong to part hi, ``[h, coded_blocks)`` to
    part lo; blocks from ``coded_blocks`` on are dropped (decode to 0).
    """

    shape: tuple
    n_pad: int
    h: int
    coded_blocks: int
    stride_b: int              # coded_blocks rounded up to ROW_ALIGN
    q: tuple                   # (q_hi, q_lo); 0 for an absent part
    code_bits: int             # 4 or 8
    words: torch.Tensor        # (a, stride_b * code_bits // 4) int32
    meta: torch.Tensor         # (a, stride_b) uint8
    tab: torch.Tensor          # (20,) float32
    betas: torch.Tensor        # (16,) float64
    dither: torch.Tensor | None            # (a, n_pad) float64
    row_scale: torch.Tensor | None         # (a,) float32 (not for dither)
    row_offset: torch.Tensor | None        # (a,) float32
    rotation: tuple | None     # (signs, orthogonal, p) float32 tensors, or None
    source: object = None      # the QuantizedMatrix (for the torch glue)

    @property
    def vectors(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        """Device memory held by the tensors of the fused kernel (rows
        padded to ``ROW_ALIGN`` blocks included)."""
        ts = [self.words, self.meta, self.tab]
        ts += [t for t in (self.row_scale, self.row_offset) if t is not None]
        return int(sum(t.numel() * t.element_size() for t in ts))

    @property
    def bytes_read(self) -> int:
        """Bytes of weight data one call of the fused kernel reads: codes
        and meta byte of every coded block, the per-vector constants and the
        table (padding is never loaded)."""
        per_block = self.code_bits + 1          # 8 codes, then the meta byte
        consts = 8 * self.vectors if self.row_scale is not None else 0
        return self.vectors * self.coded_blocks * per_block + consts + 80

    @property
    def bits_per_weight(self) -> float:
        """``8 * bytes_read / (n * a)``: compare with the file's
        ``QuantizedMatrix.bits_per_entry``."""
        n, a = self.shape
        return 8.0 * self.bytes_read / (n * a)


def _part_codes(part, count, chunk_start, chunk_count):
    """Codes (chunk, 8) and scale indices of blocks ``[chunk_start,
    chunk_start + chunk_count)`` of one payload part (``chunk_start * L`` is
    a multiple of 8 bits)."""
    from nqlib.kernels.cpu import nested as kern

    L = part["L"]
    first_byte = chunk_start * L // 8
    data = part["packed"][first_byte:first_byte + -(-chunk_count * L // 8)]
    words = np.empty(chunk_count, dtype=np.uint64)
    kern.unpack_words(np.ascontiguousarray(data), L, chunk_count, words)
    codes = np.empty((chunk_count, 8), dtype=np.int64)
    index = np.empty(chunk_count, dtype=np.int64)
    kern.split_mixed_radix(words, part["q"], codes, index)
    if chunk_count and (codes.max() >= part["q"]
                        or index.max() >= len(part["betas"])):
        raise ValueError("corrupted fixed-mode payload (code out of range)")
    return codes, index


def _e8_doubled_points(codes):
    """``Y = 2 G c`` (int64) for the basis of :func:`nqlib.lattices.E8`."""
    c = codes
    Y = np.empty_like(c)
    Y[:, 0] = 4 * c[:, 0] - 2 * c[:, 1] + c[:, 7]
    Y[:, 1:6] = 2 * (c[:, 1:6] - c[:, 2:7]) + c[:, 7:8]
    Y[:, 6] = 2 * c[:, 6] + c[:, 7]
    Y[:, 7] = c[:, 7]
    return Y


def decisions(codes, q):
    """numba's decoding decisions for each row of ``codes`` (m, 8): coset
    ``s``, coordinate ``k`` moved by the parity fix (0 if none), ``down``
    (1 when that move lowers ``r_k`` by ``D``), and the residuals ``r``
    (output = beta r / 2).

    Runs :func:`nqlib.kernels.cpu.nested.decode_multiscale_rows` at scale 1
    without dither (its output is then exactly ``r / 2``), reads the chosen
    point ``u = (Y - r) / D`` back, and checks that the integer decoder of
    the kernels, given the decisions, returns the same ``r``.
    """
    from nqlib.kernels.cpu import nested as kern

    m = codes.shape[0]
    half = np.empty((m, 8))
    kern.decode_multiscale_rows(codes, np.zeros(m, dtype=np.int64), q,
                                np.ones(1), np.zeros((1, 8)), half)
    r = (2.0 * half).astype(np.int64)
    Y = _e8_doubled_points(codes)
    D = 2 * q
    u2 = (Y - r) // q                      # 2u, u the chosen E8 point
    s = u2[:, 0] & 1
    f = (u2 - s[:, None]) // 2             # u = f + s/2
    f_plain = (Y - q * s[:, None] + q) // D
    moved = f != f_plain
    k = np.argmax(moved, axis=1)
    down = (f - f_plain)[np.arange(m), k] == 1
    # the integer decoder with these decisions (what the kernels compute)
    r_int = Y - q * s[:, None] - D * f_plain
    odd = (f_plain.sum(axis=1) & 1) == 1
    hit = odd[:, None] & (np.arange(8)[None, :] == k[:, None])
    r_int = np.where(hit, r_int - np.where(down, D, -D)[:, None], r_int)
    if (not np.array_equal(r_int, r) or np.any(moved.sum(axis=1) > 1)
            or np.any(moved.any(axis=1) != odd) or np.any((2 * half) != r)):
        raise AssertionError("integer E8 decoder disagrees with numba")
    return s, k, down.astype(np.int64), r


def gpu_layout(qm, device=None) -> GpuLayout:
    """The device layout of a fixed-mode nested-lattice QuantizedMatrix.

    Parameters
    ----------
    qm : QuantizedMatrix
        ``method="nested"``, ``mode="fixed"``; either part may be absent and
        the low part may be dropped (sketching).
    device : torch.device or str, optional
        Where the tensors go (default: CUDA when available, else CPU, for the
        Triton interpreter).

    Returns
    -------
    GpuLayout
        Codes (4 bits each when every ``q <= 16``, else 8), one byte per block
        holding the scale index and numba's two decoding decisions,
        per-part scales, and -- without dither -- the per-vector constants of
        :func:`quant_linear`: ``row_scale = alpha * |a_i| / sqrt(n_pad)``
        (1 when not normalised) and ``row_offset = mean_i - row_scale * c_i /
        sqrt(n)``, ``c_i = <raw_i, u>``, ``u`` the rotated unit all-ones
        vector (0 when not centred).

    Raises
    ------
    ValueError
        For another method or mode, or ``q > 256``.

    Notes
    -----
    Bytes per weight: ``(4 + 1) / 8`` for q <= 16, ``(8 + 1) / 8`` above,
    times the coded fraction of the blocks, plus 8 bytes per vector; see
    :attr:`GpuLayout.bits_per_weight`. Book: chapter "Kernels: CPU and GPU",
    label ``ch-kernels``.
    """
    from nqlib.quantizers.matrix import QuantizedMatrix, _dither, _padded

    if not isinstance(qm, QuantizedMatrix):
        raise ValueError(f"expected a QuantizedMatrix, got {type(qm).__name__}")
    if qm.method != "nested" or qm.mode != "fixed":
        raise ValueError("the GPU layout needs a nested-lattice matrix in fixed "
                         f"mode, got method={qm.method!r}, mode={qm.mode!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    n, a = qm.shape
    n_pad = _padded(n)
    B = n_pad // 8
    p = qm.payload
    h = int(p["h"])
    parts = [("hi", 0, h), ("lo", h, B)]
    parts = [(name, b0, b1) for name, b0, b1 in parts
             if p[name]["L"] and b1 > b0]
    coded = max((b1 for _, _, b1 in parts), default=0)
    qs = {name: int(p[name]["q"]) for name, _, _ in parts}
    if qs and max(qs.values()) > 256:
        raise ValueError(f"q up to 256 is supported, got {max(qs.values())}")
    code_bits = 4 if all(q <= 16 for q in qs.values()) else 8
    codes_all = np.zeros((a, coded, 8), dtype=np.uint8)
    meta = np.zeros((a, coded), dtype=np.uint8)
    P = qm.rotation()
    # c_i = <raw_i, u>, u the rotated unit all-ones vector (epilogue constant)
    u = np.zeros(n_pad)
    if qm.center:
        u[:n] = 1.0 / np.sqrt(n)
        u = P.apply(u) if P is not None else u
    c_dot_u = np.zeros(a)
    for name, b0, b1 in parts:
        part = p[name]
        q = qs[name]
        per = b1 - b0
        betas = np.asarray(part["betas"], dtype=np.float64)
        for v0 in range(0, a, LAYOUT_CHUNK):   # v0 * per * L is a multiple of 8
            v1 = min(a, v0 + LAYOUT_CHUNK)
            codes, index = _part_codes(part, a * per, v0 * per, (v1 - v0) * per)
            s, k, down, r = decisions(codes, q)
            codes_all[v0:v1, b0:b1] = codes.reshape(v1 - v0, per, 8)
            meta[v0:v1, b0:b1] = (index | s << COSET_SHIFT | k << FIX_SHIFT
                                  | down << DIR_SHIFT).reshape(v1 - v0, per)
            raw = betas[index][:, None] * (0.5 * r)     # numba's decode, no dither
            c_dot_u[v0:v1] += raw.reshape(v1 - v0, 8 * per) @ u[8 * b0:8 * b1]
    dither = None
    row_scale = row_offset = None
    if qm.dither:
        z = _dither(qm.seed, n_pad, a, a * B, qm.dither_key).reshape(a, n_pad)
        dither = torch.from_numpy(np.ascontiguousarray(z)).to(device)
    else:
        scale = qm.alpha * qm._row_scales()
        offset = np.zeros(a)
        if qm.center:
            offset = qm.means.astype(np.float64) - scale * c_dot_u / np.sqrt(n)
        row_scale = torch.from_numpy(scale.astype(np.float32)).to(device)
        row_offset = torch.from_numpy(offset.astype(np.float32)).to(device)
    rotation = None
    if P is not None:
        rotation = (torch.from_numpy(P.signs.astype(np.float32)).to(device),
                    torch.from_numpy(P.orthogonal.astype(np.float32)).to(device),
                    P.power_of_two)
    betas = {name: p[name]["betas"] for name in qs}
    return _assemble(codes_all, meta, (n, a), h, qs, betas, code_bits, device,
                     dither=dither, row_scale=row_scale, row_offset=row_offset,
                     rotation=rotation, source=qm)


def _assemble(codes, meta, shape, h, qs, betas, code_bits, device, **extra):
    """Pack ``codes`` (a, coded, 8) and ``meta`` (a, coded) into a
    GpuLayout: rows padded to ``ROW_ALIGN`` blocks, codes ``code_bits``
    each, the float32 ``tab`` and float64 betas of the two parts."""
    a, coded = meta.shape
    stride_b = -(-coded // ROW_ALIGN) * ROW_ALIGN
    c = np.zeros((a, stride_b, 8), dtype=np.uint8)
    c[:, :coded] = codes
    m = np.zeros((a, stride_b), dtype=np.uint8)
    m[:, :coded] = meta
    if code_bits == 4:
        packed = np.zeros((a, stride_b), dtype=np.uint32)
        for j in range(8):
            packed |= c[:, :, j].astype(np.uint32) << np.uint32(4 * j)
        words = packed.view(np.int32)
    else:
        words = c.view(np.int32).reshape(a, 2 * stride_b)
    tab = np.zeros(20, dtype=np.float32)
    betas64 = np.zeros(16)
    for slot, name in enumerate(("hi", "lo")):
        if name not in qs:
            continue
        b = np.asarray(betas[name], dtype=np.float32)
        tab[8 * slot:8 * slot + len(b)] = b / np.float32(2)      # exact
        betas64[8 * slot:8 * slot + len(b)] = b.astype(np.float64)
        D = 2 * qs[name]
        tab[16 + slot] = 1.0 / D
        tab[18 + slot] = (qs[name] + 0.5) / D
    extra.setdefault("dither", None)
    extra.setdefault("row_scale", None)
    extra.setdefault("row_offset", None)
    extra.setdefault("rotation", None)
    n = shape[0]
    return GpuLayout(
        shape=tuple(shape), n_pad=-(-n // 8) * 8, h=h, coded_blocks=coded,
        stride_b=stride_b, q=(qs.get("hi", 0), qs.get("lo", 0)),
        code_bits=code_bits,
        words=torch.from_numpy(np.ascontiguousarray(words)).to(device),
        meta=torch.from_numpy(m).to(device),
        tab=torch.from_numpy(tab).to(device),
        betas=torch.from_numpy(betas64).to(device), **extra)


def random_layout(n, a, q, betas, *, device=None, seed=0):
    """A layout of random codes and random decisions, **for timing only**:
    it decodes to arbitrary lattice vectors, not to any matrix. One part of
    ``q`` (and the given scales) covers all ``n / 8`` blocks; per-vector
    constants are 1 and 0, no rotation. Building it costs no quantization
    (an 8192 x 28672 matrix takes minutes to quantize on a CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    B = -(-n // 8)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, q, size=(a, B, 8), dtype=np.uint8)
    meta = (rng.integers(0, len(betas), size=(a, B))
            | rng.integers(0, 256, size=(a, B)) & 0xF8).astype(np.uint8)
    ones = torch.ones(a, dtype=torch.float32, device=device)
    return _assemble(codes, meta, (n, a), B, {"hi": int(q)}, {"hi": betas},
                     4 if q <= 16 else 8, device, row_scale=ones,
                     row_offset=torch.zeros_like(ones))


# ------------------------------------------------------------- launchers
def _check_layout(layout):
    if not isinstance(layout, GpuLayout):
        raise ValueError(f"layout must be a GpuLayout (from gpu_layout), got "
                         f"{type(layout).__name__}")


#: Kernel variants: "gemv" (one row of x per program, 2-D register tiles),
#: "fma" (BLOCK_M rows, a 3-D FMA accumulator), "dot" (tl.dot per coordinate).
KINDS = ("gemv", "fma", "dot")


def _config(m, n_vectors):
    """``(kind, BLOCK_M, BLOCK_N, BLOCK_B, num_warps)`` for m input rows.

    The decode costs the same whatever the number of rows it serves, so the
    variant is chosen by the compiled instructions per weight of its loop
    (sm_90 SASS, :func:`loop_instruction_counts`, float32 products): about
    17.5 for "gemv" (one row), 22 for "fma" with 2 rows, 36 with 4, 38 for
    "dot" with 16 rows and 93 with 64. BLOCK_N is small for a GEMV so that
    it still has hundreds of programs (an H100 has 132 SMs).
    """
    if m == 1:
        return "gemv", 1, 16 if n_vectors <= 8192 else 32, 32, 4
    if m == 2:
        return "fma", 2, 16, 32, 4
    if m <= 4:
        return "fma", 4, 16, 16, 4
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return "dot", block_m, 64, 16, 4


def _coordinate_major(x_rot, layout):
    """``x[m, j, b] = x_rot[m, 8b + j]`` for the coded blocks, zero for the
    padding blocks, as a (M, 8, stride_b) float32 tensor: the kernels then
    read ``x_j`` of consecutive blocks from consecutive addresses (16-byte
    loads, one cache line per warp) instead of at a stride of 32 bytes."""
    m = x_rot.shape[0]
    bc = layout.coded_blocks
    x = torch.zeros((m, 8, layout.stride_b), dtype=torch.float32,
                    device=x_rot.device)
    x[:, :, :bc] = x_rot[:, :8 * bc].reshape(m, bc, 8).transpose(1, 2)
    return x


def _launch_matmul(x_rot, layout, out, xsum, bias, precision, config):
    m = x_rot.shape[0]
    N = layout.vectors
    kind, block_m, block_n, block_b, warps = config or _config(m, N)
    if kind not in KINDS:
        raise ValueError(f"kernel kind must be one of {KINDS}, got {kind!r}")
    if kind == "dot" and min(block_m, block_n, block_b) < 16:
        raise ValueError("tl.dot needs BLOCK_M, BLOCK_N, BLOCK_B >= 16")
    epilogue = xsum is not None
    dummy = layout.tab
    x_rot = _coordinate_major(x_rot, layout)
    args = (x_rot, layout.words, layout.meta, layout.tab, out,
            xsum if epilogue else dummy,
            layout.row_scale if epilogue else dummy,
            layout.row_offset if epilogue else dummy,
            bias if bias is not None else dummy,
            m, N, layout.stride_b, layout.h, layout.q[0], layout.q[1],
            x_rot.stride(0), x_rot.stride(1), out.stride(0))
    common = dict(CODE_BITS=layout.code_bits, BLOCK_N=block_n, BLOCK_B=block_b,
                  EPILOGUE=epilogue, HAS_BIAS=bias is not None,
                  num_warps=warps, enable_fp_fusion=True)
    if kind == "gemv":
        grid = (triton.cdiv(N, block_n), m)
        _decode_gemv_kernel[grid](*args, **common)
        return
    grid = (triton.cdiv(N, block_n), triton.cdiv(m, block_m))
    _decode_matmul_kernel[grid](*args, BLOCK_M=block_m, USE_DOT=kind == "dot",
                                PRECISION=precision, **common)


def decode_matmul(x_rot, layout, *, precision="ieee", config=None):
    """``x_rot @ W_dec.T`` (float32), ``W_dec`` the raw decode of the layout's
    vectors (no shrinkage, projection or dither), never materialised.

    Parameters
    ----------
    x_rot : torch.Tensor, shape (M, n_pad)
        Contiguous float32 rows in the coded (rotated, padded) domain, on the
        layout's device.
    layout : GpuLayout
        From :func:`gpu_layout`, without dither.
    precision : {"ieee", "tf32", "tf32x3"}
        Input precision of ``tl.dot`` (used for M > 4). ``"ieee"`` keeps
        float32 products (on an H100 it runs on the FMA units); ``"tf32"``
        uses tensor cores and rounds both operands to 10-bit mantissas.
    config : tuple, optional
        ``(kind, BLOCK_M, BLOCK_N, BLOCK_B, num_warps)``, ``kind`` in
        :data:`KINDS`, to override the heuristic (benchmarks, tests).

    Returns
    -------
    torch.Tensor, shape (M, a), float32

    Notes
    -----
    Decoding is exact, so the result differs from a float64 product only by
    float32 round-off in the products and sums. Book: chapter "Kernels: CPU
    and GPU", label ``ch-kernels``.
    """
    _check_layout(layout)
    if layout.dither is not None:
        raise ValueError("the fused kernel does not support dithered matrices "
                         "(the dither is a dense matrix of its own); use "
                         "decode_rows")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got "
                         f"{precision!r}")
    check_rows(x_rot, "x_rot", layout.n_pad, (torch.float32,),
               layout.words.device)
    out = torch.empty((x_rot.shape[0], layout.vectors), dtype=torch.float32,
                      device=x_rot.device)
    if x_rot.shape[0] and layout.vectors:
        if layout.coded_blocks == 0:
            out.zero_()
        else:
            _launch_matmul(x_rot, layout, out, None, None, precision, config)
    return out


def quant_linear(x, layout, bias=None, *, precision="ieee", config=None):
    """``x @ W_hat.T + bias`` for the weight ``W_hat`` a QuantLinear holds.

    ``layout`` is :func:`gpu_layout` of the QuantizedMatrix of ``W.T``
    (``a`` = out_features vectors of length ``n`` = in_features), without
    dither. With ``x_rot = P [x, 0]`` (rotation, zero padding) and
    ``s = sum(x)``, each output is

        out_i = row_scale_i * <x_rot, raw_i> + s * row_offset_i + bias_i,

    which is ``s_i alpha (<x_rot, raw_i> - <x_rot, u> c_i) + mu_i s + b_i``
    because ``<x_rot, u> = s / sqrt(n)``, and the padding projection of the
    decoder is invisible to ``x_rot`` (it is zero on the padded coordinates
    before the rotation). Returns float32 ``(M, a)``.
    """
    _check_layout(layout)
    if layout.row_scale is None:
        raise ValueError("dithered matrices are not supported by the fused "
                         "kernel")
    n, a = layout.shape
    if x.ndim != 2 or x.shape[1] != n:
        raise ValueError(f"x must have shape (M, {n}), got {tuple(x.shape)}")
    dev = layout.words.device
    xf = x.detach().to(device=dev, dtype=torch.float32)
    m = xf.shape[0]
    if layout.n_pad > n:
        x_rot = torch.zeros((m, layout.n_pad), dtype=torch.float32, device=dev)
        x_rot[:, :n] = xf
    else:
        x_rot = xf.contiguous()
    if layout.rotation is not None:
        from nqlib.kernels.gpu.hadamard_triton import random_hadamard

        signs, O, p = layout.rotation
        x_rot = random_hadamard(x_rot, signs, O, p)
    xsum = xf.sum(dim=1).contiguous()
    out = torch.empty((m, a), dtype=torch.float32, device=dev)
    if m == 0 or a == 0:
        return out
    if bias is not None:
        bias = bias.detach().to(device=dev, dtype=torch.float32).contiguous()
    if layout.coded_blocks == 0:
        out = xsum[:, None] * layout.row_offset[None, :]
        return out + bias[None, :] if bias is not None else out
    _launch_matmul(x_rot, layout, out, xsum, bias, precision, config)
    return out


def decode_rows(layout, dtype=torch.float64):
    """The raw decode ``(a, n_pad)`` of the layout's vectors (dither
    subtracted), equal bit for bit to the numba decoder in float64 (float32:
    its rounding). Dropped blocks are 0."""
    _check_layout(layout)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    a = layout.vectors
    dev = layout.words.device
    out = torch.zeros((a, layout.n_pad), dtype=dtype, device=dev)
    if a == 0 or layout.coded_blocks == 0:
        return out
    block_n, block_b = 16, 32
    has_dither = layout.dither is not None
    grid = (triton.cdiv(a, block_n), triton.cdiv(layout.coded_blocks, block_b))
    _decode_rows_kernel[grid](
        layout.words, layout.meta, layout.tab, layout.betas,
        layout.dither if has_dither else layout.betas, out,
        a, layout.coded_blocks, layout.stride_b, layout.h, layout.q[0],
        layout.q[1], layout.n_pad, CODE_BITS=layout.code_bits, BLOCK_N=block_n,
        BLOCK_B=block_b, HAS_DITHER=has_dither, enable_fp_fusion=False)
    return out


def decoded_rows(qm, layout=None, device=None):
    """``qm._rows()`` on the device: the raw decode, projected (padding and,
    when centred, the mean direction) and shrunk by ``alpha``; float64."""
    if layout is None:
        layout = gpu_layout(qm, device)
    Y = decode_rows(layout, torch.float64)
    n = qm.shape[0]
    P = qm.rotation()
    dev = Y.device
    if P is not None:
        from nqlib.kernels.gpu.hadamard_triton import random_hadamard

        signs = torch.from_numpy(np.array(P.signs)).to(dev)
        O = torch.from_numpy(np.array(P.orthogonal)).to(dev)

        def rot(t, inverse):
            return random_hadamard(t.contiguous(), signs, O, P.power_of_two,
                                   inverse=inverse)
    else:
        def rot(t, inverse):
            return t
    if qm.n_pad > n:
        Z = rot(Y, True)
        Z[:, n:] = 0.0
        Y = rot(Z, False)
    if qm.center:
        e = torch.zeros((1, qm.n_pad), dtype=torch.float64, device=dev)
        e[0, :n] = 1.0 / math.sqrt(n)
        u = rot(e, False)[0]
        Y = Y - torch.outer(Y @ u, u)
    return Y * qm.alpha


def dequantized_rows(qm, layout=None, device=None):
    """``qm.dequantize().T`` on the device: (a, n) float64."""
    Y = decoded_rows(qm, layout, device)
    n = qm.shape[0]
    P = qm.rotation()
    if P is not None:
        from nqlib.kernels.gpu.hadamard_triton import random_hadamard

        dev = Y.device
        Y = random_hadamard(Y, torch.from_numpy(np.array(P.signs)).to(dev),
                            torch.from_numpy(np.array(P.orthogonal)).to(dev),
                            P.power_of_two, inverse=True)
    Z = Y[:, :n] * torch.from_numpy(qm._row_scales()).to(Y.device)[:, None]
    if qm.center:
        Z = Z + torch.from_numpy(qm.means.astype(np.float64)).to(Y.device)[:, None]
    return Z


# ------------------------------------------------- compiled instruction count
def _loop_body(lines, label_re, branch_re):
    """Line span of the longest backward branch: the K loop (the kernels
    here have one loop; the only other backward branch is the one-line
    trap at the end of SASS)."""
    import re

    labels, body = {}, (0, -1)
    for i, line in enumerate(lines):
        m = re.match(label_re, line)
        if m:
            labels[m.group(1)] = i
        b = re.search(branch_re, line)
        if b and b.group(1) in labels and i - labels[b.group(1)] > body[1] - body[0]:
            body = (labels[b.group(1)], i)
    return body


def _ptx_opcodes(ptx):
    import re

    lines = ptx.splitlines()
    span = _loop_body(lines, r"^(\$L__BB\d+_\d+):",
                      r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
    ops = []
    for line in lines[span[0]:span[1] + 1]:
        toks = line.split()
        if toks and toks[0].startswith("@"):            # predicate guard
            toks = toks[1:]
        if toks and re.match(r"[a-z]", toks[0]) and line.rstrip().endswith(";"):
            ops.append(toks[0])
    return ops


def _sass_text(cubin):
    """The SASS of ``cubin`` by nvdisasm (shipped with Triton's NVIDIA
    backend), or None when nvdisasm is missing."""
    import subprocess
    import tempfile
    from pathlib import Path

    import triton.backends.nvidia as nv

    tool = Path(nv.__file__).parent / "bin" / "nvdisasm"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        return subprocess.run([str(tool), "-c", fh.name], capture_output=True,
                              text=True, check=True).stdout


def _sass_opcodes(cubin):
    """Opcodes of the loop in the SASS of ``cubin``; None without nvdisasm."""
    import re

    text = _sass_text(cubin)
    if text is None:
        return None
    lines = text.splitlines()
    span = _loop_body(lines, r"^(\.L_x_\d+):", r"\bBRA\s+`?\(?(\.L_x_\d+)")
    ops = []
    for line in lines[span[0]:span[1] + 1]:
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?);", line)
        if m:
            toks = m.group(1).split()
            if toks[0].startswith("@"):
                toks = toks[1:]
            ops.append(toks[0])
    return ops


def loop_instruction_counts(config=("gemv", 1, 16, 32, 4), code_bits=4, arch=90,
                            precision="ieee"):
    """Compile the fused kernel for an NVIDIA GPU of compute capability
    ``arch`` (no GPU needed) and count the instructions of its K loop.

    Returns a dict: PTX and SASS instruction counts of one loop iteration
    (per thread), the weights one iteration decodes per thread, the
    instructions per weight (``count * threads / weights per iteration``;
    each weight serves all ``BLOCK_M`` rows), and the most frequent SASS
    opcodes. Under ``TRITON_INTERPRET=1`` the kernels are interpreted, so
    the compilation runs in a subprocess without it.
    """
    import collections
    import json
    import os
    import subprocess
    import sys

    if not isinstance(_decode_matmul_kernel, triton.runtime.JITFunction):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        code = ("import json; from nqlib.kernels.gpu.matmul_triton import "
                "loop_instruction_counts as f; "
                f"print(json.dumps(f({tuple(config)!r}, {code_bits}, {arch}, "
                f"{precision!r})))")
        res = subprocess.run([sys.executable, "-c", code], env=env,
                             capture_output=True, text=True, timeout=600)
        if res.returncode:
            raise RuntimeError(f"compiling for sm_{arch} failed:\n"
                               f"{res.stderr[-2000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    from triton.backends.compiler import GPUTarget

    kind, block_m, block_n, block_b, warps = config
    cx = dict(CODE_BITS=code_bits, BLOCK_N=block_n, BLOCK_B=block_b,
              EPILOGUE=True, HAS_BIAS=True)
    if kind != "gemv":
        cx.update(BLOCK_M=block_m, USE_DOT=kind == "dot", PRECISION=precision)
    fn = _decode_gemv_kernel if kind == "gemv" else _decode_matmul_kernel
    f32 = "*fp32"
    sig = dict(x_ptr=f32, words_ptr="*i32", meta_ptr="*u8", tab_ptr=f32,
               out_ptr=f32, xsum_ptr=f32, scale_ptr=f32, offset_ptr=f32,
               bias_ptr=f32)
    # ints as Triton specialises them at run time: strides divisible by 16
    sig.update({k: "i32" for k in ("M", "N", "stride_b", "H", "q_hi", "q_lo",
                                   "stride_xm", "stride_xj", "stride_om")})
    sig.update({k: "constexpr" for k in cx})
    attrs = {(i,): [["tt.divisibility", 16]]
             for i, k in enumerate(sig) if k.endswith("_ptr")
             or k in ("stride_b", "stride_xm", "stride_xj", "stride_om")}
    src = triton.compiler.ASTSource(fn=fn, signature=sig,
                                    constexprs=cx, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": warps, "enable_fp_fusion": True})
    ptx_ops = _ptx_opcodes(kernel.asm["ptx"])
    sass_ops = _sass_opcodes(kernel.asm["cubin"])
    threads = 32 * warps
    weights = block_n * block_b * 8
    out = dict(arch=f"sm_{arch}", config=list(config), code_bits=code_bits,
               precision=precision,
               threads=threads, weights_per_iteration=weights,
               ptx_per_iteration=len(ptx_ops),
               ptx_per_weight=len(ptx_ops) * threads / weights)
    if sass_ops is not None:
        top = collections.Counter(o.split(".")[0] for o in sass_ops)
        out.update(sass_per_iteration=len(sass_ops),
                   sass_per_weight=len(sass_ops) * threads / weights,
                   sass_opcodes=dict(top.most_common()))
    return out
