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
Instead the host-side builder (:mod:`nqlib.quantizers.fixed_layout`) runs
the numba decoder once and stores what it decided
(:func:`nqlib.quantizers.cpu_layout.stored_fields`), so that the GPU decode
is exact integer arithmetic with no search, no comparison of distances and
no floor, and equals numba's bit for bit (``beta * r / 2`` is exact in
float64; float32 results are its rounding).

Stored halves
-------------
Before the parity fix, the residuals ``r_j = a_j - D f_j`` (``a = Y - qs``)
lie in ``[-q, q)``, and all eight have one parity: ``Y_j = c_7`` mod 2 for
the basis of E8 and ``D`` is even. So ``r_j + q = 2 m_j + pi`` with the
*half* ``m_j`` in ``[0, q)`` -- 4 bits for ``q <= 16`` like the code
``c_j`` it replaces -- and one parity bit ``pi`` per block. The fix moves
one coordinate ``k`` by ``D`` towards 0 (down when ``r_k >= 0``; numba never
moves it the other way, which would add ``4 D |r_k|`` to ``|r|^2``), so a
block needs ``pi``, whether the fix applies and ``k``: with the scale index,
one byte. For a block, with ``X = sum_j x_j`` (computed once per row of
activations and shared by all vectors),

    <x, r / 2> = sum_j x_j m_j + (pi - q) / 2 * X + [odd] (-+q) x_k,

so the loop does per weight one field extraction (a logical and), one exact
integer-to-float step (the field alone is the subnormal float ``m
2^(p - 149)``; one multiplication by ``2^126`` makes it normal; no conversion
instruction) and one fma with the activation, pre-scaled by ``2^(23 - p)``.

Kernels
-------
``_decode_gemv_kernel`` (one row of activations per program),
``_decode_matmul_kernel`` (``BLOCK_M`` rows: FMAs on a 3-D accumulator, or
one ``tl.dot`` per coordinate) and ``_decode_rows_kernel`` (decode to
memory, for :func:`nqlib.inner_products`). The activations are passed tiled along
K, ``x[m, t, j, i] = x_rot[m, 8 (t BLOCK_B + i) + j]`` plus the block sums
as a ninth coordinate, and padded, so that ``x_j`` of consecutive blocks is
contiguous at a fixed offset and no load of ``x`` needs a mask. The K loop
is split by part (tiles of part hi, the tile holding block ``h``, tiles of
part lo) so that ``q`` is a scalar in the two loops. In the FMA kernels the
parity fix is not applied to the weights but added as ``fix * x_k`` per
block (``x_k`` re-read from the cache).

FMAs or ``tl.dot``: a ``tl.dot`` tile has at least 16 rows, so for one to
four rows of activations it would spend 4-16 times the multiply-adds
needed; those cases use FMAs on a register accumulator that is reduced once
after the K loop. From five rows on, one ``tl.dot`` per coordinate
multiplies the decoded ``[BLOCK_N, BLOCK_B]`` weights into the
accumulator, in float32 (``"ieee"``, on the FMA units) by default or on the
tensor cores (``"tf32"``). The thresholds come from the instruction counts
of the compiled loops (``benchmarks/gpu_isa.py``).

Layout (per vector, per coded block)
------------------------------------
* ``words``: the 8 halves ``m_j``, 4 bits each in one int32 when
  ``q <= 16``, else 8 bits each in two int32 -- 4 or 8 bytes per block;
* ``meta``: one uint8, ``pi | odd << 1 | k << 2 | index << 5`` (index < 8
  scales; ``odd``: the parity fix applies, to coordinate ``k``);
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

from nqlib import _backend

# the bit fields of the layout (meta byte, row padding, scale tables) are
# shared with the host-side builder, nqlib.quantizers.fixed_layout
from nqlib.kernels.gpu.fixed_format import (  # noqa: F401  (re-exported)
    FIX_SHIFT,
    INDEX_SHIFT,
    ODD_SHIFT,
    PARITY_SHIFT,
    ROW_ALIGN,
    TAB_SIZE,
)
from nqlib.kernels.gpu.lattice_triton import check_rows

_INDEX_SHIFT = tl.constexpr(INDEX_SHIFT)
#: Rows of a tile of activations (see :func:`tiled_activations`): the 8 coordinates
#: scaled by ``2^(23 - p_j)`` (``p_j`` the bit position of ``m_j`` in its
#: word when the kernels read it), the block sum, the 8 coordinates unscaled.
X_ROWS = 17
_X_ROWS = tl.constexpr(X_ROWS)
#: ``p_j`` for 4-bit halves (m_5 .. m_7 are read from the word shifted right
#: by 12) and for 8-bit halves (bytes 2 and 3 from the word shifted by 16).
FIELD_SHIFTS = {4: (0, 4, 8, 12, 16, 8, 12, 16), 8: (0, 8, 0, 8, 0, 8, 0, 8)}
#: tl.dot precisions accepted by :func:`decode_matmul`.
PRECISIONS = ("ieee", "tf32", "tf32x3")


# ------------------------------------------------------------ the decoder
@triton.jit
def _load_words(words_ptr, blk_off, mask, CODE_BITS: tl.constexpr):
    """The packed halves of a tile: one int32 per block (``m_j`` in bits
    ``4j .. 4j+3``) twice, or two (``m_j`` in byte ``j % 4`` of the first
    for j < 4, else of the second). Masked lanes are left undefined: any
    bits decode to finite values, which meet zero activations (padding
    blocks) or are never stored (padding vectors)."""
    if CODE_BITS == 4:
        w = tl.load(words_ptr + blk_off, mask=mask)
        return w, w
    else:
        lo = tl.load(words_ptr + 2 * blk_off, mask=mask)
        hi = tl.load(words_ptr + 2 * blk_off + 1, mask=mask)
        return lo, hi


@triton.jit
def _field(src, p: tl.constexpr, ones: tl.constexpr):
    """The integer in bits ``p .. p + log2(ones + 1) - 1`` of ``src`` as
    float32, for ``p + log2(ones + 1) <= 23``, with no conversion
    instruction: those bits, under the exponent of ``2^(23 - p)``, are the
    float ``2^(23 - p) + m`` exactly, and subtracting ``2^(23 - p)`` is
    exact. One logical op and one add."""
    bits = (src & (ones << p)) | ((150 - p) << 23)
    return bits.to(tl.float32, bitcast=True) - (1 << (23 - p))


@triton.jit
def _scaled_field(src, p: tl.constexpr, ones: tl.constexpr):
    """``2^(p - 23) m`` for the integer ``m`` in bits ``p .. p + log2(ones +
    1) - 1`` of ``src`` (``<= 22``), as float32, in two instructions: those
    bits alone, read as a float, are the subnormal ``m 2^(p - 149)``, and
    one multiplication by ``2^126`` makes it normal, exactly. The kernels
    scale the activation ``x_j`` by ``2^(23 - p)`` instead (exact), so the
    fma gives ``x_j m_j``. Needs subnormals kept: Triton emits ``mul.f32``
    without ``.ftz`` (checked by ``benchmarks/gpu_isa.py``)."""
    bits = src & (ones << p)
    return bits.to(tl.float32, bitcast=True) * 8.507059173023462e37


@triton.jit
def _half(lo, hi, j: tl.constexpr, CODE_BITS: tl.constexpr,
          SCALED: tl.constexpr = False):
    """``m_j`` (an integer in [0, q)) as float32, or ``2^(p_j - 23) m_j``
    when ``SCALED`` (``p_j = FIELD_SHIFTS[CODE_BITS][j]``). Fields that end above
    bit 22 are first shifted down by one shift shared by several fields."""
    if CODE_BITS == 4:
        if j < 5:
            src = lo
            p = 4 * j
        else:
            src = lo >> 12
            p = 4 * j - 12
        ones = 15
    else:
        if j < 4:
            word = lo
        else:
            word = hi
        if j % 4 < 2:
            src = word
            p = 8 * (j % 4)
        else:
            src = word >> 16
            p = 8 * (j % 4) - 16
        ones = 255
    if SCALED:
        v = _scaled_field(src, p, ones)
    else:
        v = _field(src, p, ones)
    return v


@triton.jit
def _block_terms(words_ptr, meta_ptr, blk_off, mask, q, tab_at,
                 CODE_BITS: tl.constexpr):
    """Per block of a [vectors, blocks] tile: the packed words, the offset
    ``(pi - q) / 2``, the parity fix ``delta / 2`` (``-q``, ``0`` or ``q``)
    of coordinate ``k``, ``k`` itself, and the block's entry of ``tab``
    (``tab_at`` = 8 * part, plus the scale index). Coordinate ``j`` of the
    block decodes to

        r_j / 2 = m_j + (pi - q) / 2 + [j = k] delta / 2,

    all small integers or half-integers, exact in float32. ``q`` and
    ``tab_at`` are scalars when the tile lies in one part."""
    meta = tl.load(meta_ptr + blk_off, mask=mask).to(tl.int32)
    qf = q.to(tl.float32)
    pi = meta & 1
    k4 = meta & 28                             # 4 k
    scale_at = (meta >> _INDEX_SHIFT) + tab_at
    lo, hi = _load_words(words_ptr, blk_off, mask, CODE_BITS)
    # the fix moves r_k towards 0 by D: down when r_k = 2 m_k + pi - q >= 0
    if CODE_BITS == 4:
        mk = (lo >> k4) & 15
    else:
        mk = (tl.where(k4 < 16, lo, hi) >> (2 * (k4 & 12))) & 255
    fix = tl.where((meta & 2) != 0, tl.where(2 * mk + pi >= q, -qf, qf), 0.0)
    base = pi.to(tl.float32) * 0.5 - 0.5 * qf
    return lo, hi, base, fix, k4 >> 2, scale_at


# --------------------------------------------------------- fused matmul
@triton.jit
def _gemv_step(acc, x_row, words_ptr, meta_ptr, tab_ptr, rn, n_ok, b0, stride_b,
               q, tab_at, CODE_BITS: tl.constexpr, BLOCK_B: tl.constexpr,
               SCALED: tl.constexpr):
    """One K step of the GEMV: ``acc += beta <x_block, r_block / 2>`` for the
    blocks ``b0 .. b0 + BLOCK_B - 1`` of ``BLOCK_N`` vectors."""
    # stride_b is a multiple of 16, so the block mask is constant over runs
    # of 16 blocks and the loads below are vectorised
    blk = b0 + tl.arange(0, BLOCK_B)
    w_mask = n_ok[:, None] & (blk < stride_b)[None, :]
    blk_off = rn[:, None] * stride_b + blk[None, :]
    lo, hi, base, fix, k, scale_at = _block_terms(
        words_ptr, meta_ptr, blk_off, w_mask, q, tab_at, CODE_BITS)
    hb = tl.load(tab_ptr + scale_at)                 # scale_at < 16 always
    # <x_block, r_block / 2> = sum_j x_j m_j + base sum_j x_j + fix x_k.
    # The tile of x is padded, so no load needs a mask; its coordinates are
    # at fixed offsets, and the block sum is shared by all vectors
    xt = x_row + _X_ROWS * b0 + tl.arange(0, BLOCK_B)
    xk = tl.load(xt[None, :] + (9 + k) * BLOCK_B)    # x_k, from the cache
    s = tl.load(xt + 8 * BLOCK_B)[None, :] * base + xk * fix
    # SCALED: the pre-scaled rows 0..7 times the subnormal-trick halves;
    # else the plain rows 9..16 times the halves as normal floats
    if SCALED:
        xc = xt
    else:
        xc = xt + 9 * BLOCK_B
    for j in tl.static_range(8):
        s += tl.load(xc + j * BLOCK_B)[None, :] * _half(lo, hi, j, CODE_BITS, SCALED)
    return acc + s * hb


@triton.jit
def _decode_gemv_kernel(
    x_ptr,          # (M, T, X_ROWS, BLOCK_B) float32, T = cdiv(stride_b,
                    # BLOCK_B): the rotated inputs tiled along K by tiled_activations
                    # (rows 0..7 scaled coordinates, 8 the block sum, 9..16
                    # the plain coordinates of block b = t BLOCK_B + i)
    words_ptr,      # (N, stride_b * CODE_BITS / 4) int32: packed halves m_j
    meta_ptr,       # (N, stride_b) uint8: pi | odd << 1 | k << 2 | index << 5
    tab_ptr,        # (16,) float32: beta per part and scale
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
    stride_xm, stride_om,
    CODE_BITS: tl.constexpr,    # 4 (q <= 16) or 8 bits per half m_j
    BLOCK_N: tl.constexpr,      # vectors per program
    BLOCK_B: tl.constexpr,      # 8-blocks per K step (K tile = 8 BLOCK_B)
    EPILOGUE: tl.constexpr,     # out = scale acc + xsum offset (+ bias)
    HAS_BIAS: tl.constexpr,
    SCALED: tl.constexpr = True,  # subnormal-trick halves (see _scaled_field)
):
    # one row of x per program (axis 1): every tensor is 2-D [vectors,
    # blocks] in one register layout, so the loop needs no shared memory
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_row = x_ptr + tl.program_id(1).to(tl.int64) * stride_xm
    n_ok = rn < N
    # one partial sum per (vector, block lane), reduced once after the loop
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    # the K loop, split by part so that q and the table offset are scalars:
    # tiles of part hi, the tile holding block H (both parts), tiles of lo
    h_end = (H // BLOCK_B) * BLOCK_B
    for b0 in range(0, h_end, BLOCK_B):
        acc = _gemv_step(acc, x_row, words_ptr, meta_ptr, tab_ptr, rn, n_ok, b0,
                         stride_b, q_hi, 0, CODE_BITS, BLOCK_B, SCALED)
    lo_start = h_end
    if h_end < H:
        lo_part = (h_end + tl.arange(0, BLOCK_B) >= H)[None, :]
        acc = _gemv_step(acc, x_row, words_ptr, meta_ptr, tab_ptr, rn, n_ok,
                         h_end, stride_b, tl.where(lo_part, q_lo, q_hi),
                         tl.where(lo_part, 8, 0), CODE_BITS, BLOCK_B, SCALED)
        lo_start = h_end + BLOCK_B
    for b0 in range(lo_start, stride_b, BLOCK_B):
        acc = _gemv_step(acc, x_row, words_ptr, meta_ptr, tab_ptr, rn, n_ok, b0,
                         stride_b, q_lo, 8, CODE_BITS, BLOCK_B, SCALED)
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
def _dot_coordinate(acc, x_ptrs, lo, hi, j: tl.constexpr, k, hb, shift, shift_k,
                    BLOCK_B: tl.constexpr, PRECISION: tl.constexpr,
                    CODE_BITS: tl.constexpr):
    """``acc += x_j @ w_j.T`` with ``w_j = beta r_j / 2 = beta m_j +
    shift``: one fma per weight on the per-block ``shift = beta (pi - q) / 2``
    (``shift_k``, with the parity fix, at ``j = k``)."""
    xj = tl.load(x_ptrs + (9 + j) * BLOCK_B)                      # [BM, BB]
    w = _half(lo, hi, j, CODE_BITS) * hb + tl.where(k == j, shift_k, shift)
    return tl.dot(xj, tl.trans(w), acc, input_precision=PRECISION)


@triton.jit
def _fma_coordinate(s, x_ptrs, lo, hi, j: tl.constexpr, BLOCK_B: tl.constexpr,
                    CODE_BITS: tl.constexpr, SCALED: tl.constexpr):
    """``s += x_j m_j`` on the [rows, vectors, blocks] accumulator (rows
    0..7 of the tile, pre-scaled, with the subnormal-trick halves when
    ``SCALED``; else rows 9..16 and the halves as normal floats)."""
    if SCALED:
        xj = tl.load(x_ptrs + j * BLOCK_B)[:, None, :]
    else:
        xj = tl.load(x_ptrs + (9 + j) * BLOCK_B)[:, None, :]
    return s + xj * _half(lo, hi, j, CODE_BITS, SCALED)[None]


@triton.jit
def _matmul_step(acc, x_rows, words_ptr, meta_ptr, tab_ptr, rn, n_ok, b0,
                 stride_b, q, tab_at, CODE_BITS: tl.constexpr,
                 BLOCK_B: tl.constexpr, USE_DOT: tl.constexpr,
                 PRECISION: tl.constexpr, SCALED: tl.constexpr):
    """One K step of :func:`_decode_matmul_kernel` (blocks ``b0 .. b0 +
    BLOCK_B - 1``)."""
    # stride_b is a multiple of 16, so the block mask is constant over
    # runs of 16 blocks and the loads below are vectorised
    blk = b0 + tl.arange(0, BLOCK_B)
    w_mask = n_ok[:, None] & (blk < stride_b)[None, :]
    blk_off = rn[:, None] * stride_b + blk[None, :]
    lo, hi, base, fix, k, scale_at = _block_terms(
        words_ptr, meta_ptr, blk_off, w_mask, q, tab_at, CODE_BITS)
    hb = tl.load(tab_ptr + scale_at)             # scale_at < 16 always
    x_ptrs = x_rows + _X_ROWS * b0               # [BM, BB], row 0 of the tile
    if USE_DOT:
        # w_j = beta m_j + beta (pi - q) / 2 (+ beta delta / 2 at j = k)
        shift = base * hb
        shift_k = (base + fix) * hb
        for j in tl.static_range(8):
            acc = _dot_coordinate(acc, x_ptrs, lo, hi, j, k, hb, shift, shift_k,
                                  BLOCK_B, PRECISION, CODE_BITS)
    else:
        # as in the GEMV kernel: sum_j x_j m_j + base sum_j x_j + fix x_k,
        # times beta
        xs = tl.load(x_ptrs + 8 * BLOCK_B)[:, None, :]
        xk = tl.load(x_ptrs[:, None, :] + ((9 + k) * BLOCK_B)[None])
        s = xs * base[None] + xk * fix[None]
        for j in tl.static_range(8):
            s = _fma_coordinate(s, x_ptrs, lo, hi, j, BLOCK_B, CODE_BITS, SCALED)
        acc += s * hb[None]
    return acc


@triton.jit
def _decode_matmul_kernel(
    x_ptr,          # (>= M, T, X_ROWS, BLOCK_B) float32: as for the GEMV kernel,
                    # rows padded to a multiple of BLOCK_M with zeros
    words_ptr,      # (N, stride_b * CODE_BITS / 4) int32: packed halves m_j
    meta_ptr,       # (N, stride_b) uint8: pi | odd << 1 | k << 2 | index << 5
    tab_ptr,        # (16,) float32: beta per part and scale
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
    stride_xm, stride_om,
    CODE_BITS: tl.constexpr,    # 4 (q <= 16) or 8 bits per half m_j
    BLOCK_M: tl.constexpr,      # rows of x per program
    BLOCK_N: tl.constexpr,      # vectors per program
    BLOCK_B: tl.constexpr,      # 8-blocks per K step (K tile = 8 BLOCK_B)
    USE_DOT: tl.constexpr,      # tl.dot per coordinate, else FMAs
    PRECISION: tl.constexpr,    # tl.dot input precision
    EPILOGUE: tl.constexpr,     # out = scale acc + xsum offset (+ bias)
    HAS_BIAS: tl.constexpr,
    SCALED: tl.constexpr = True,  # subnormal-trick halves (FMA variant)
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
    x_rows = x_ptr + rm[:, None] * stride_xm + tl.arange(0, BLOCK_B)[None, :]
    # the K loop, split by part as in the GEMV kernel
    h_end = (H // BLOCK_B) * BLOCK_B
    for b0 in range(0, h_end, BLOCK_B):
        acc = _matmul_step(acc, x_rows, words_ptr, meta_ptr, tab_ptr, rn, n_ok,
                           b0, stride_b, q_hi, 0, CODE_BITS, BLOCK_B, USE_DOT,
                           PRECISION, SCALED)
    lo_start = h_end
    if h_end < H:
        lo_part = (h_end + tl.arange(0, BLOCK_B) >= H)[None, :]
        acc = _matmul_step(acc, x_rows, words_ptr, meta_ptr, tab_ptr, rn, n_ok,
                           h_end, stride_b, tl.where(lo_part, q_lo, q_hi),
                           tl.where(lo_part, 8, 0), CODE_BITS, BLOCK_B, USE_DOT,
                           PRECISION, SCALED)
        lo_start = h_end + BLOCK_B
    for b0 in range(lo_start, stride_b, BLOCK_B):
        acc = _matmul_step(acc, x_rows, words_ptr, meta_ptr, tab_ptr, rn, n_ok,
                           b0, stride_b, q_lo, 8, CODE_BITS, BLOCK_B, USE_DOT,
                           PRECISION, SCALED)
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
def _store_coordinate(out_ptrs, z_ptrs, mask, lo, hi, j: tl.constexpr, k, base,
                      fix, beta, HAS_DITHER: tl.constexpr, CODE_BITS: tl.constexpr):
    """``beta * (r_j / 2 - z)`` in float64, as the numba decoder computes it
    (``r_j / 2 = m_j + base + [j = k] fix = y_j - q Q(y / q)_j`` exactly)."""
    v = _half(lo, hi, j, CODE_BITS).to(tl.float64) + tl.where(
        k == j, base + fix, base).to(tl.float64)
    if HAS_DITHER:
        v = v - tl.load(z_ptrs + j, mask=mask, other=0.0)
    v = beta * v
    tl.store(out_ptrs + j, v.to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _decode_rows_kernel(
    words_ptr,      # (N, stride_b * CODE_BITS / 4) int32: packed halves m_j
    meta_ptr,       # (N, stride_b) uint8: pi | odd << 1 | k << 2 | index << 5
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
    lo_part = (blk >= H)[None, :]                    # part lo: blocks h ..
    lo, hi, base, fix, k, scale_at = _block_terms(
        words_ptr, meta_ptr, blk_off, mask, tl.where(lo_part, q_lo, q_hi),
        tl.where(lo_part, 8, 0), CODE_BITS)
    beta = tl.load(beta_ptr + scale_at, mask=mask, other=0.0)
    offs = rn[:, None] * row_len + blk[None, :] * 8
    out_ptrs = out_ptr + offs
    z_ptrs = z_ptr + offs
    _store_coordinate(out_ptrs, z_ptrs, mask, lo, hi, 0, k, base, fix, beta,
                      HAS_DITHER, CODE_BITS)
    _store_coordinate(out_ptrs, z_ptrs, mask, lo, hi, 1, k, base, fix, beta,
                      HAS_DITHER, CODE_BITS)
    _store_coordinate(out_ptrs, z_ptrs, mask, lo, hi, 2, k, base, fix, beta,
                      HAS_DITHER, CODE_BITS)
    _store_coordinate(out_ptrs, z_ptrs, mask, lo, hi, 3, k, base, fix, beta,
                      HAS_DITHER, CODE_BITS)
    _store_coordinate(out_ptrs, z_ptrs, mask, lo, hi, 4, k, base, fix, beta,
                      HAS_DITHER, CODE_BITS)
    _store_coordinate(out_ptrs, z_ptrs, mask, lo, hi, 5, k, base, fix, beta,
                      HAS_DITHER, CODE_BITS)
    _store_coordinate(out_ptrs, z_ptrs, mask, lo, hi, 6, k, base, fix, beta,
                      HAS_DITHER, CODE_BITS)
    _store_coordinate(out_ptrs, z_ptrs, mask, lo, hi, 7, k, base, fix, beta,
                      HAS_DITHER, CODE_BITS)


# ---------------------------------------------------------------- layout
@dataclass(eq=False)
class GpuLayout:
    """Device tensors of a fixed-mode QuantizedMatrix, for the kernels here.

    Build with :func:`upload` from the host arrays of
    :mod:`nqlib.quantizers.fixed_layout` (``fixed_layout.gpu_layout(qm,
    device)`` does both). ``shape = (n, a)`` is the matrix's shape:
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
    code_bits: int             # 4 or 8 bits per half m_j
    words: torch.Tensor        # (a, stride_b * code_bits // 4) int32
    meta: torch.Tensor         # (a, stride_b) uint8
    tab: torch.Tensor          # (16,) float32
    betas: torch.Tensor        # (16,) float64
    dither: torch.Tensor | None            # (a, n_pad) float64
    row_scale: torch.Tensor | None         # (a,) float32 (not for dither)
    row_offset: torch.Tensor | None        # (a,) float32
    rotation: tuple | None     # (signs, orthogonal, p) float32 tensors, or None

    @property
    def vectors(self) -> int:
        """Number of coded vectors (output features)."""
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
        """Bytes of weight data one call of the fused kernel reads: halves
        and meta byte of every coded block, the per-vector constants and the
        table (padding is never loaded)."""
        per_block = self.code_bits + 1          # 8 halves, then the meta byte
        consts = 8 * self.vectors if self.row_scale is not None else 0
        return (self.vectors * self.coded_blocks * per_block + consts
                + 4 * TAB_SIZE)

    @property
    def bits_per_weight(self) -> float:
        """``8 * bytes_read / (n * a)``: compare with the file's
        ``QuantizedMatrix.bits_per_entry``."""
        n, a = self.shape
        return 8.0 * self.bytes_read / (n * a)


def _rotation_tensors(rotation, dtype, device):
    """``(signs, O, p)`` of a rotation given as ``(signs, orthogonal,
    power_of_two)`` numpy arrays, as ``dtype`` tensors on ``device``, in the
    form :func:`~nqlib.kernels.gpu.hadamard_triton.random_hadamard` takes."""
    signs, orthogonal, p = rotation
    return (torch.from_numpy(np.asarray(signs).astype(dtype)).to(device),
            torch.from_numpy(np.asarray(orthogonal).astype(dtype)).to(device),
            p)


def _tensor(arr, device):
    return None if arr is None else torch.from_numpy(arr).to(device)


def upload(arrays, device=None) -> GpuLayout:
    """Copy a host-side layout to ``device``.

    Parameters
    ----------
    arrays : nqlib.quantizers.fixed_layout.FixedLayoutArrays
        The layout's numpy arrays (any object with its attributes).
    device : torch.device or str, optional
        Where the tensors go (default:
        :func:`nqlib._backend.default_torch_device`: CUDA when available,
        else CPU, for the Triton interpreter).

    Returns
    -------
    GpuLayout
        The same arrays as tensors (the rotation as float32), the scalars
        as they are.
    """
    if device is None:
        device = _backend.default_torch_device()
    device = torch.device(device)
    a = arrays
    rotation = (None if a.rotation is None
                else _rotation_tensors(a.rotation, np.float32, device))
    return GpuLayout(
        shape=tuple(a.shape), n_pad=int(a.n_pad), h=int(a.h),
        coded_blocks=int(a.coded_blocks), stride_b=int(a.stride_b),
        q=tuple(int(q) for q in a.q), code_bits=int(a.code_bits),
        words=_tensor(np.ascontiguousarray(a.words), device),
        meta=_tensor(np.ascontiguousarray(a.meta), device),
        tab=_tensor(a.tab, device), betas=_tensor(a.betas, device),
        dither=_tensor(a.dither, device), row_scale=_tensor(a.row_scale, device),
        row_offset=_tensor(a.row_offset, device), rotation=rotation)


# ------------------------------------------------------------- launchers
def _check_layout(layout):
    if not isinstance(layout, GpuLayout):
        raise ValueError(f"layout must be a GpuLayout (from upload), got "
                         f"{type(layout).__name__}")


#: Kernel variants: "gemv" (one row of x per program, 2-D register tiles),
#: "fma" (BLOCK_M rows, a 3-D FMA accumulator), "dot" (tl.dot per coordinate).
KINDS = ("gemv", "fma", "dot")


def _config(m, n_vectors):
    """``(kind, BLOCK_M, BLOCK_N, BLOCK_B, num_warps)`` for m input rows.

    The decode costs the same whatever the number of rows it serves, so the
    variant is chosen by the compiled instructions per weight of its loop
    (sm_90 SASS, ``benchmarks/gpu_isa.py``, float32 products): about
    7.4 for "gemv" (one row), 11 for "fma" with 2 rows, 20 with 4, 30 for
    "dot" with 16 rows and 82 with 64 (17.5, 22, 36, 38 and 93 when the
    layout stored the codes ``c`` and the kernels ran the integer decoder).
    BLOCK_N is small for a GEMV so that it still has hundreds of programs
    (an H100 has 132 SMs).
    """
    if m == 1:
        return "gemv", 1, 16 if n_vectors <= 8192 else 32, 32, 4
    if m == 2:
        return "fma", 2, 16, 32, 4
    if m <= 4:
        return "fma", 4, 16, 16, 4
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return "dot", block_m, 64, 16, 4


@triton.jit
def _tile_kernel(xr_ptr, out_ptr, M, BC, stride_xr, T,
                 CODE_BITS: tl.constexpr, BLOCK_B: tl.constexpr):
    """One (row, K tile) of :func:`tiled_activations`: rows 0..7 the scaled
    coordinates, row 8 the block sums, rows 9..16 the plain coordinates,
    zeros past the coded blocks and the input rows."""
    mm = tl.program_id(0)
    t = tl.program_id(1)
    i = tl.arange(0, BLOCK_B)
    j = tl.arange(0, 8)
    b = t * BLOCK_B + i
    limit = tl.where(mm < M, BC, 0)          # no coded blocks on padding rows
    ok = (b < limit)[:, None] & (j < 8)[None, :]
    src = xr_ptr + mm.to(tl.int64) * stride_xr + 8 * b[:, None] + j[None, :]
    xv = tl.load(src, mask=ok, other=0.0)                       # [BB, 8]
    # 2^(23 - p_j) built from its bits (exact): p_j = FIELD_SHIFTS[CODE_BITS][j]
    if CODE_BITS == 4:
        p = tl.where(j < 5, 4 * j, 4 * j - 12)
    else:
        p = (j % 2) * 8
    scale = ((150 - p) << 23).to(tl.float32, bitcast=True)
    base = out_ptr + (mm.to(tl.int64) * T + t) * (_X_ROWS * BLOCK_B)
    rows = base + j[None, :] * BLOCK_B + i[:, None]
    tl.store(rows, xv * scale[None, :])
    tl.store(base + 8 * BLOCK_B + i, tl.sum(xv, axis=1))
    tl.store(rows + 9 * BLOCK_B, xv)


def tiled_activations(x_rot, layout, block_m, block_b):
    """The activations as the fused kernels read them.

    Parameters
    ----------
    x_rot : torch.Tensor, shape (M, n_pad)
        Contiguous float32 rows in the coded domain.
    layout : GpuLayout
    block_m, block_b : int
        Rows and blocks of the kernel's tiles.

    Returns
    -------
    torch.Tensor
        A (M', T, X_ROWS, block_b) float32 tensor, ``T = cdiv(stride_b,
        block_b)``.

    Notes
    -----
    For block
    ``b = t block_b + i``, row ``j < 8`` holds ``x_rot[m, 8b + j] * 2^(23 -
    p_j)`` (``p_j`` from :data:`FIELD_SHIFTS`: the inverse scale of the half
    the kernels multiply it with), row 8 the block's sum and rows 9..16 the
    unscaled coordinates; zero past the coded blocks and for the padding
    rows up to ``M'``, a multiple of ``block_m``. Per K step a program then
    reads ``x_j`` of consecutive blocks at consecutive addresses and fixed
    offsets, and no load needs a mask. One launch of :func:`_tile_kernel`
    (no host-to-device copy, so it can be captured in a CUDA graph).
    """
    m = x_rot.shape[0]
    T = -(-layout.stride_b // block_b)
    rows = -(-m // block_m) * block_m
    x = torch.empty((rows, T, X_ROWS, block_b), dtype=torch.float32,
                    device=x_rot.device)
    if rows and T:
        _tile_kernel[(rows, T)](x_rot, x, m, layout.coded_blocks,
                                x_rot.stride(0), T, CODE_BITS=layout.code_bits,
                                BLOCK_B=block_b, enable_fp_fusion=False)
    return x


def subnormals_kept(device) -> bool:
    """Whether the GEMV/FMA kernels may read halves as subnormal floats.

    Parameters
    ----------
    device : torch.device or str
        Where the kernels run.

    Returns
    -------
    bool

    Notes
    -----
    See :func:`_scaled_field`. On CUDA the compiled code keeps subnormals
    (Triton emits ``mul.f32`` without ``.ftz``, checked by
    ``benchmarks/gpu_isa.py``). Under the interpreter the kernels run
    as numpy on the host, whose flush-to-zero / denormals-are-zero state
    (e.g. ``torch.set_flush_denormal(True)``) would turn every half into 0:
    probe it, and fall back to the conversion-free normal-float halves.
    """
    if torch.device(device).type == "cuda":
        return True
    tiny = np.array([1], dtype=np.int32).view(np.float32)   # 2^-149
    return bool((tiny * np.float32(2.0**126))[0] != 0)


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
    x = tiled_activations(x_rot, layout, 1 if kind == "gemv" else block_m, block_b)
    args = (x, layout.words, layout.meta, layout.tab, out,
            xsum if epilogue else dummy,
            layout.row_scale if epilogue else dummy,
            layout.row_offset if epilogue else dummy,
            bias if bias is not None else dummy,
            m, N, layout.stride_b, layout.h, layout.q[0], layout.q[1],
            x.stride(0), out.stride(0))
    common = dict(CODE_BITS=layout.code_bits, BLOCK_N=block_n, BLOCK_B=block_b,
                  EPILOGUE=epilogue, HAS_BIAS=bias is not None,
                  SCALED=subnormals_kept(x_rot.device),
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
        From :func:`upload` (or ``nqlib.quantizers.fixed_layout.gpu_layout``),
        without dither.
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

    ``layout`` is the layout (``nqlib.quantizers.fixed_layout.gpu_layout``)
    of the QuantizedMatrix of ``W.T``
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
        layout.words, layout.meta, layout.betas,
        layout.dither if has_dither else layout.betas, out,
        a, layout.coded_blocks, layout.stride_b, layout.h, layout.q[0],
        layout.q[1], layout.n_pad, CODE_BITS=layout.code_bits, BLOCK_N=block_n,
        BLOCK_B=block_b, HAS_DITHER=has_dither, enable_fp_fusion=False)
    return out


def decoded_rows(layout, *, center, alpha, rotation=None):
    """The coded rows of a matrix (``QuantizedMatrix.coded_rows()``),
    computed on the layout's device.

    Parameters
    ----------
    layout : GpuLayout
        The matrix's layout.
    center : bool
        Whether the matrix was centred (the mean direction is projected out).
    alpha : float
        The shrinkage factor.
    rotation : tuple, optional
        ``(signs, orthogonal, power_of_two)`` numpy arrays of the matrix's
        random Hadamard rotation (None: not rotated).

    Returns
    -------
    torch.Tensor, shape (a, n_pad), float64
        The raw decode (:func:`decode_rows`), projected (padding and, when
        centred, the mean direction) and shrunk by ``alpha``.
    """
    Y = decode_rows(layout, torch.float64)
    n, n_pad = layout.shape[0], layout.n_pad
    dev = Y.device
    if rotation is not None:
        from nqlib.kernels.gpu.hadamard_triton import random_hadamard

        rot64 = _rotation_tensors(rotation, np.float64, dev)

        def rot(t, inverse):
            return random_hadamard(t.contiguous(), *rot64, inverse=inverse)
    else:
        def rot(t, inverse):
            return t
    if n_pad > n:
        Z = rot(Y, True)
        Z[:, n:] = 0.0
        Y = rot(Z, False)
    if center:
        e = torch.zeros((1, n_pad), dtype=torch.float64, device=dev)
        e[0, :n] = 1.0 / math.sqrt(n)
        u = rot(e, False)[0]
        Y = Y - torch.outer(Y @ u, u)
    return Y * alpha


def dequantized_rows(layout, *, center, alpha, row_scales, means=None,
                     rotation=None):
    """The dequantized matrix, transposed (``QuantizedMatrix.dequantize().T``),
    computed on the layout's device.

    Parameters
    ----------
    layout, center, alpha, rotation :
        As for :func:`decoded_rows`.
    row_scales : ndarray, shape (a,)
        The per-vector scales (``QuantizedMatrix.row_scales()``), float64.
    means : ndarray, shape (a,), optional
        The column means (float64), added when ``center``.

    Returns
    -------
    torch.Tensor, shape (a, n), float64
    """
    Y = decoded_rows(layout, center=center, alpha=alpha, rotation=rotation)
    n = layout.shape[0]
    if rotation is not None:
        from nqlib.kernels.gpu.hadamard_triton import random_hadamard

        Y = random_hadamard(Y, *_rotation_tensors(rotation, np.float64, Y.device),
                            inverse=True)
    Z = Y[:, :n] * torch.from_numpy(np.asarray(row_scales)).to(Y.device)[:, None]
    if center:
        Z = Z + torch.from_numpy(np.asarray(means)).to(Y.device)[:, None]
    return Z


# ------------------------------------------------------- for compilation
#: The ``@triton.jit`` functions of this module by name, for compiling them
#: outside a launch (instruction counts of their loops:
#: ``benchmarks/gpu_isa.py``; the sm_90 compilation test).
JIT_KERNELS = {
    "gemv": _decode_gemv_kernel,
    "matmul": _decode_matmul_kernel,
    "decode_rows": _decode_rows_kernel,
    "tile": _tile_kernel,
}
