"""Fused decode-matmul for trellis-coded weights on the CPU (``mode="trellis"``).

The weight (``a`` coded vectors -- the rows of ``W`` -- of ``n_pad``
coordinates, of which the first ``keep`` are coded) is read from its packed
bit stream and is never decoded to memory as a whole: the batch-1 kernel
(:func:`gemv`) decodes every weight in registers inside the dot products,
and the batched kernel (:func:`gemm`) decodes a tile of 16 rows by ``KC``
coordinates (16 KiB of float32, in L1) at a time and multiplies it into
every row of the batch with the register tiles of the fixed-mode kernel
(:func:`nqlib.kernels.cpu.fused.tile_product`), applying the per-row scale,
mean term and bias as it stores.

Decoding one weight
-------------------
Vector ``c`` is cut into ``per_col = ceil(keep / seq_len)`` sequences;
sequence ``i`` covers coordinates ``[cut_i, cut_{i+1})``, ``cut_i = floor(i
keep / per_col)``, and its ``T = cut_{i+1} - cut_i`` weights share the
stream bits ``[off, off + Bs)`` with ``off = floor(E_0 B / E)`` and ``off +
Bs = floor(E_1 B / E)`` (``E_0 = c keep + cut_i``, ``E_1 = c keep +
cut_{i+1}``, ``E = a keep``, ``B`` the stream's bits): the layout of
:class:`nqlib.quantizers.trellis.Layout`, recomputed here from the five
numbers ``a, keep, seq_len, B`` and ``i`` instead of being stored. Step
``t`` of the sequence has the state made of the ``L`` stream bits that end
at bit ``P[t+1] = floor((t+1) Bs / T)`` (read circularly: the stream is
tail-biting), and the weight is ``beta * table[state_index(state)]`` --
the same integer operations and the same float32 product as the numba
decoder :func:`nqlib.kernels.cpu.trellis.decode_sequences`, so the decoded
values are the same bits.

Rather than shifting ``k_t`` new bits into a running state, the kernels
read the state itself: the ``L <= 20`` bits that end at stream bit ``off +
P[t+1]``. So the steps are independent but for ``P``, which advances by
Bresenham's rule (``Bs = q T + r``: ``P`` gains ``q + 1`` exactly when
``(t r) mod T + r >= T``). The first few steps of a sequence, whose window
wraps around the end of the stream (``P[t+1] < L``), are decoded by the
scalar :func:`weight_value` (a 32-bit big-endian read, twice when the
window wraps); every later step by 8 lanes at once.

The 8 lanes are 8 rows (vectors ``8 g .. 8 g + 7``) at the same coordinate:
their sequences have the same length and the same ``x`` entry (broadcast);
only their stream offsets and bit counts differ. The steps run in blocks of
``S = (57 - L) // (q_max + 1) + 1`` (9 at 4 bits per entry, 14 at 2, for
``L = 16``): at the start of a block each lane loads the 64 stream bits
from the byte where its window starts (one 64-bit gather and a byte swap),
which hold the windows of the whole block. Per step and lane: two 64-bit
shifts cut the state out, the hash (two 32-bit multiplications, a shift and
an xor, a shift), one gather from the 16 KiB table, a multiplication by
``beta``, the Bresenham step (add, compare, two selects, add) and one fused
multiply-add per row of activations. The loops are written as LLVM vector
IR (numba ``@intrinsic``, as in :mod:`nqlib.kernels.cpu.fused`): the AVX2
``vpgatherdq`` / ``vgatherdps`` when the CPU has them, lane-by-lane loads
otherwise (same results). At batch 1 the loop is bound by the two gathers
and the hash, not by memory (``benchmarks/cpu_linear.py`` measures it: rows
``nq-T2``, ``nq-T4``).

Rows past ``a`` (the last group of 8, and the padding to a tile of 16)
decode the last row again and are dropped by the drivers.

No import from the rest of nqlib but the kernels of
:mod:`nqlib.kernels.cpu` (the guard, the hash of
:mod:`nqlib.kernels.cpu.trellis`, the rotation and register tiles of
:mod:`nqlib.kernels.cpu.fused`). Arrays in, arrays out.
Book: chapter "Beyond E8: trellis codes", label ``ch-trellis``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from nqlib.kernels.cpu.fused import (
    HAVE_AVX2,
    MC,
    MR,
    Emit,
    array_data,
    rotate_rows,
    tile_product,
)
from nqlib.kernels.cpu.guard import guard_module, guarded, serial, threadsafe
from nqlib.kernels.cpu.trellis import state_index

#: coordinates per K tile of the batched kernel (a tile of 16 rows is
#: 16 KiB of float32)
KC = 256
#: most rows of activations the batch-1 kernel takes in one pass
GEMV_MAX_ROWS = 4
#: zero bytes after the stream: the 64-bit reads of the last windows stay
#: inside the array
STREAM_PAD = 8
#: most state bits the kernels read: the scalar 32-bit window read holds
#: ``L + 7 <= 32`` bits, and a 64-bit block at least one step of ``<= 9``
#: bits beyond a window (``57 - L >= 9``); the format allows ``L <= 20``
MAX_STATE_BITS = 25
#: the lane fields of :func:`lane_setup` (rows of its (5, 8) int32 array)
LANE_BASE, LANE_REL, LANE_Q, LANE_R, LANE_E = range(5)

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
_V8I = ir.VectorType(_I32, 8)
_V8F = ir.VectorType(_F32, 8)


# ------------------------------------------------------- scalar decoding
@njit(cache=True, inline="always")
def cut(i, keep, per_col):
    """First coordinate of sequence ``i`` of a vector: ``floor(i keep /
    per_col)``."""
    return (i * keep) // per_col


@njit(cache=True, inline="always")
def sequence_bits(c, i, keep, per_col, coded, total_bits):
    """``(off, Bs)``: first stream bit and stream bits of sequence ``i`` of
    vector ``c`` (``coded = a keep`` entries share ``total_bits`` bits in
    proportion to their lengths)."""
    e0 = c * keep + cut(i, keep, per_col)
    e1 = c * keep + cut(i + 1, keep, per_col)
    b0 = (e0 * total_bits) // coded
    b1 = (e1 * total_bits) // coded
    return b0, b1 - b0


@njit(cache=True, inline="always")
def read_bits(data, pos, n):
    """``n <= 25`` stream bits from bit ``pos``, most significant first (a
    32-bit big-endian read: ``data`` has :data:`STREAM_PAD` bytes after the
    stream)."""
    b = pos >> 3
    w = ((np.int64(data[b]) << 24) | (np.int64(data[b + 1]) << 16)
         | (np.int64(data[b + 2]) << 8) | np.int64(data[b + 3]))
    return (w >> (32 - (pos & 7) - n)) & ((1 << n) - 1)


@njit(cache=True, inline="always")
def window(data, off, Bs, end, L):
    """The ``L`` stream bits that end at bit ``end`` (``1 <= end <= Bs``) of
    the circular stream of ``Bs >= L`` bits at ``off``: the state after the
    step whose last new bit is ``end - 1``."""
    start = end - L
    if start >= 0:
        return read_bits(data, off + start, L)
    hi = read_bits(data, off + Bs + start, -start)
    return (hi << end) | read_bits(data, off, end)


@njit(cache=True, inline="always")
def weight_value(data, off, Bs, T, t, L, mult, shift, qbits, table, beta):
    """The decoded weight of step ``t`` of a sequence of ``T`` weights and
    ``Bs`` stream bits at ``off``: ``beta * table[state_index(state)]``
    (float32 product)."""
    s = window(data, off, Bs, ((t + 1) * Bs) // T, L)
    return beta * table[state_index(s, mult, shift, qbits)]


@njit(cache=True)
def lane_setup(data, a, keep, per_col, total_bits, L, r0, i, t0, t1, lanes,
               offs, bits):
    """Per lane ``l`` (row ``min(r0 + l, a - 1)``), sequence ``i``: its
    stream offset and bits (``offs``, ``bits``), and the first step ``tv``
    in ``[t0, t1]`` from which no lane's window wraps (``P[t+1] >= L``); for
    ``tv < t1`` the lane fields of the vector loop at step ``tv`` in
    ``lanes`` (5, 8) int32: byte of the stream offset, window start
    relative to it (bits), ``q``, ``r`` (``Bs = q T + r``) and Bresenham's
    remainder ``((tv + 1) Bs) mod T``. Returns ``tv``."""
    T = cut(i + 1, keep, per_col) - cut(i, keep, per_col)
    coded = a * keep
    tv = t0
    for lane in range(8):
        c = min(r0 + lane, a - 1)
        off, Bs = sequence_bits(c, i, keep, per_col, coded, total_bits)
        offs[lane] = off
        bits[lane] = Bs
        # first t with (t + 1) Bs >= L T
        tv = max(tv, -(-(L * T) // Bs) - 1)
    tv = min(tv, t1)
    if tv < t1:
        for lane in range(8):
            off = offs[lane]
            Bs = bits[lane]
            prod = (tv + 1) * Bs
            lanes[LANE_BASE, lane] = off >> 3
            lanes[LANE_REL, lane] = (off & 7) + prod // T - L
            lanes[LANE_Q, lane] = Bs // T
            lanes[LANE_R, lane] = Bs % T
            lanes[LANE_E, lane] = prod % T
    return tv


# ------------------------------------------------------- vector decoding
def _vi(v):
    return ir.Constant(_V8I, [ir.Constant(_I32, int(v))] * 8)


def _gather_i64(b, base, idx):
    """Unaligned 64-bit loads at the byte offsets ``idx`` (4 i32 lanes) of the
    byte pointer ``base``."""
    if HAVE_AVX2:
        v4q = ir.VectorType(_I64, 4)
        fn = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(v4q, [v4q, base.type, idx.type, v4q, _I8]),
            "llvm.x86.avx2.gather.d.q.256")
        ones = ir.Constant(v4q, [ir.Constant(_I64, -1)] * 4)
        return b.call(fn, [ir.Constant(v4q, [ir.Constant(_I64, 0)] * 4), base,
                           idx, ones, ir.Constant(_I8, 1)])
    out = ir.Constant(ir.VectorType(_I64, 4), ir.Undefined)
    for lane in range(4):
        k = ir.Constant(_I32, lane)
        at = b.sext(b.extract_element(idx, k), _I64)
        p = b.bitcast(b.gep(base, [at]), _I64.as_pointer())
        out = b.insert_element(out, b.load(p, align=1), k)
    return out


def _gather_f32(b, table, idx):
    """``table[idx]`` lane by lane (float32 pointer, i32 indices)."""
    if HAVE_AVX2:
        fn = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(_V8F, [_V8F, table.type, _V8I, _V8F, _I8]),
            "llvm.x86.avx2.gather.d.ps.256")
        return b.call(fn, [ir.Constant(_V8F, [0.0] * 8), table, idx,
                           b.bitcast(_vi(-1), _V8F), ir.Constant(_I8, 4)])
    out = ir.Constant(_V8F, ir.Undefined)
    for lane in range(8):
        k = ir.Constant(_I32, lane)
        at = b.sext(b.extract_element(idx, k), _I64)
        out = b.insert_element(out, b.load(b.gep(table, [at]), align=4), k)
    return out


def _steps_codegen(R):
    """Steps ``0 .. n - 1`` from the lane fields ``lanes`` (see
    :func:`lane_setup`): with ``R = 0`` the decoded weights of step ``s``
    go to ``buf[d0 + ds s + l]`` (lane ``l``); with ``R >= 1`` they meet
    ``R`` rows of activations: ``acc[r, l] += w_l(s) x[r, d0 + s]``.

    The steps run in blocks of ``S = (57 - L) // (q_max + 1) + 1``: at the
    start of a block each lane loads the 64 stream bits from the byte of
    its window (a window starts less than 8 bits into it and moves at most
    ``q_max + 1`` bits per step, so the ``S`` windows of the block lie in
    those 64 bits), and every step cuts its state out of them with two
    shifts."""

    def codegen(context, builder, sig, args):
        (data, lanes, table, T, n, L, mult, shift, qbits, beta, dst, d0,
         ds, acc) = args
        t = sig.args
        b = builder
        em = Emit(b)
        pdata = array_data(context, b, t[0], data)
        plan = b.bitcast(array_data(context, b, t[1], lanes), _V8I.as_pointer())
        ptab = array_data(context, b, t[2], table)
        pdst = array_data(context, b, t[10], dst)

        def lane_field(k):
            return b.load(b.gep(plan, [ir.Constant(_I32, k)]), align=4)

        base = lane_field(LANE_BASE)
        qv = lane_field(LANE_Q)
        rv = lane_field(LANE_R)
        qmax = b.extract_element(qv, ir.Constant(_I32, 0))
        for lane in range(1, 8):
            ql = b.extract_element(qv, ir.Constant(_I32, lane))
            qmax = b.select(b.icmp_signed(">", ql, qmax), ql, qmax)
        S = b.add(b.sdiv(b.sub(ir.Constant(_I64, 57), L),
                         b.add(b.sext(qmax, _I64), ir.Constant(_I64, 1))),
                  ir.Constant(_I64, 1))
        v4q = ir.VectorType(_I64, 4)
        top64 = b.sub(ir.Constant(_I64, 64), L)
        top = em.splat(top64, v4q)
        Tv = em.splat(b.trunc(T, _I32), _V8I)
        multv = em.splat(b.trunc(mult, _I32), _V8I)
        shiftv = em.splat(b.trunc(shift, _I32), _V8I)
        qshift = em.splat(b.trunc(b.sub(ir.Constant(_I64, 32), qbits), _I32), _V8I)
        betav = em.splat(beta, _V8F)
        bswap = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(v4q, [v4q]), "llvm.bswap.v4i64")
        rel_slot = cgutils.alloca_once_value(b, lane_field(LANE_REL))
        e_slot = cgutils.alloca_once_value(b, lane_field(LANE_E))
        if R:
            pacc = b.bitcast(array_data(context, b, t[13], acc), _V8F.as_pointer())
            acc_slots = [cgutils.alloca_once_value(
                b, b.load(b.gep(pacc, [ir.Constant(_I32, r)]), align=4))
                for r in range(R)]
            width = b.extract_value(context.make_array(t[10])(
                context, b, dst).shape, 1)
            rows = [b.gep(pdst, [b.add(b.mul(width, ir.Constant(_I64, r)), d0)])
                    for r in range(R)]
        zero = ir.Constant(_I64, 0)
        one = ir.Constant(_I64, 1)
        lo4 = ir.Constant(ir.VectorType(_I32, 4), [0, 1, 2, 3])
        hi4 = ir.Constant(ir.VectorType(_I32, 4), [4, 5, 6, 7])
        with cgutils.for_range_slice(b, zero, n, S, inc=True) as (s0, _):
            rel0 = b.load(rel_slot)
            idx = b.add(base, b.ashr(rel0, _vi(3)))
            wbit = b.and_(rel0, _vi(-8))
            win = [b.call(bswap, [_gather_i64(b, pdata, b.shuffle_vector(
                idx, idx, half))]) for half in (lo4, hi4)]
            stop = b.add(s0, S)
            stop = b.select(b.icmp_signed("<", stop, n), stop, n)
            with cgutils.for_range_slice(b, s0, stop, one, inc=True) as (s, _):
                rel = b.load(rel_slot)
                e = b.load(e_slot)
                d = b.sub(rel, wbit)
                parts = [b.lshr(b.shl(win[k], b.zext(b.shuffle_vector(
                    d, d, half), v4q)), top) for k, half in enumerate((lo4, hi4))]
                state = b.trunc(b.shuffle_vector(parts[0], parts[1], ir.Constant(
                    _V8I, list(range(8)))), _V8I)
                h = b.mul(state, multv)
                h = b.xor(h, b.lshr(h, shiftv))
                h = b.mul(h, multv)
                val = b.fmul(betav, _gather_f32(b, ptab, b.lshr(h, qshift)))
                # Bresenham: P[t+2] - P[t+1] = q + ((e + r) >= T)
                e2 = b.add(e, rv)
                carry = b.icmp_signed(">=", e2, Tv)
                b.store(b.select(carry, b.sub(e2, Tv), e2), e_slot)
                b.store(b.add(rel, b.add(qv, b.zext(carry, _V8I))), rel_slot)
                if R:
                    for r in range(R):
                        xv = em.splat(b.load(b.gep(rows[r], [s])), _V8F)
                        b.store(em.fma(val, xv, b.load(acc_slots[r])),
                                acc_slots[r])
                else:
                    at = b.add(d0, b.mul(s, ds))
                    p = b.bitcast(b.gep(pdst, [at]), _V8F.as_pointer())
                    b.store(val, p, align=4)
        if R:
            for r in range(R):
                b.store(b.load(acc_slots[r]), b.gep(pacc, [ir.Constant(_I32, r)]),
                        align=4)
        return context.get_dummy_value()

    return codegen


def _steps_intrinsic(R):
    @intrinsic
    def _steps(typingctx, data, lanes, table, T, n, L, mult, shift, qbits, beta,
               dst, d0, ds, acc):
        sig = types.void(data, lanes, table, types.int64, types.int64,
                         types.int64, types.int64, types.int64, types.int64,
                         types.float32, dst, types.int64, types.int64, acc)
        return sig, _steps_codegen(R)

    return _steps


_decode_steps = _steps_intrinsic(0)
_dot1, _dot2, _dot3, _dot4 = (_steps_intrinsic(r) for r in range(1, 5))


@njit(cache=True)
def _dot_steps(R, data, lanes, table, T, n, L, mult, shift, qbits, beta, x, d0,
               acc):
    if R == 1:
        _dot1(data, lanes, table, T, n, L, mult, shift, qbits, beta, x, d0, 0, acc)
    elif R == 2:
        _dot2(data, lanes, table, T, n, L, mult, shift, qbits, beta, x, d0, 0, acc)
    elif R == 3:
        _dot3(data, lanes, table, T, n, L, mult, shift, qbits, beta, x, d0, 0, acc)
    else:
        _dot4(data, lanes, table, T, n, L, mult, shift, qbits, beta, x, d0, 0, acc)


# ---------------------------------------------------------------- tiles
@njit(cache=True)
def decode_group(data, a, keep, seq_len, total_bits, L, mult, shift, qbits,
                 table, beta, r0, k0, k1, buf, lane0, stride):
    """Decode rows ``r0 .. r0 + 7`` (rows past ``a`` repeat row ``a - 1``)
    at coordinates ``[k0, k1)`` (``k1 <= keep``): the weight of row ``r0 +
    l`` at coordinate ``k`` goes to ``buf[stride (k - k0) + lane0 + l]``."""
    per_col = -(-keep // seq_len)
    lanes = np.empty((5, 8), np.int32)
    offs = np.empty(8, np.int64)
    bits = np.empty(8, np.int64)
    i = (k0 * per_col) // keep
    while cut(i + 1, keep, per_col) <= k0:
        i += 1
    while i < per_col and cut(i, keep, per_col) < k1:
        c0 = cut(i, keep, per_col)
        T = cut(i + 1, keep, per_col) - c0
        t0 = max(k0, c0) - c0
        t1 = min(k1, c0 + T) - c0
        tv = lane_setup(data, a, keep, per_col, total_bits, L, r0, i, t0, t1,
                        lanes, offs, bits)
        for t in range(t0, tv):
            at = stride * (c0 + t - k0) + lane0
            for lane in range(8):
                buf[at + lane] = weight_value(data, offs[lane], bits[lane], T, t,
                                              L, mult, shift, qbits, table, beta)
        if tv < t1:
            _decode_steps(data, lanes, table, T, t1 - tv, L, mult, shift, qbits,
                          beta, buf, stride * (c0 + tv - k0) + lane0, stride,
                          buf)
        i += 1


@njit(cache=True)
def dot_group(data, a, keep, seq_len, total_bits, L, mult, shift, qbits, table,
              beta, r0, x, acc):
    """``acc[r, l] += <x_r, raw_{r0 + l}>`` over the coded coordinates, for
    the ``R = acc.shape[0] <= GEMV_MAX_ROWS`` rows ``x_r`` of rotated
    activations and the rows ``r0 .. r0 + 7`` of the weight (past ``a``:
    row ``a - 1`` again), every weight decoded in registers."""
    per_col = -(-keep // seq_len)
    R = acc.shape[0]
    lanes = np.empty((5, 8), np.int32)
    offs = np.empty(8, np.int64)
    bits = np.empty(8, np.int64)
    for i in range(per_col):
        c0 = cut(i, keep, per_col)
        T = cut(i + 1, keep, per_col) - c0
        tv = lane_setup(data, a, keep, per_col, total_bits, L, r0, i, 0, T,
                        lanes, offs, bits)
        for t in range(tv):
            for lane in range(8):
                v = weight_value(data, offs[lane], bits[lane], T, t, L, mult,
                                 shift, qbits, table, beta)
                for r in range(R):
                    acc[r, lane] += v * x[r, c0 + t]
        if tv < T:
            _dot_steps(R, data, lanes, table, T, T - tv, L, mult, shift, qbits,
                       beta, x, c0 + tv, acc)


@njit(cache=True, parallel=True)
def decode_rows(data, a, keep, seq_len, total_bits, L, mult, shift, qbits, table,
                beta, out):
    """The decoded vectors ``out`` (a, keep) float32, through the kernels'
    own decoder (the tiles of :func:`decode_group`): the values of
    :func:`nqlib.kernels.cpu.trellis.decode_sequences`, bit for bit. For
    tests and for reading a few rows; the products never call it."""
    G = -(-a // 8)
    for g in prange(G):
        buf = np.empty(8 * KC, np.float32)
        for k0 in range(0, keep, KC):
            k1 = min(keep, k0 + KC)
            decode_group(data, a, keep, seq_len, total_bits, L, mult, shift,
                         qbits, table, beta, 8 * g, k0, k1, buf, 0, 8)
            for lane in range(min(8, a - 8 * g)):
                for k in range(k0, k1):
                    out[8 * g + lane, k] = buf[8 * (k - k0) + lane]


@njit(cache=True, parallel=True)
def gemv(data, a, keep, seq_len, total_bits, L, mult, shift, qbits, table, beta,
         x, acc):
    """``acc[r, i] = <x_r, raw_i>`` (``acc`` (R, 8 G), ``G = ceil(a / 8)``)
    for the ``R <= GEMV_MAX_ROWS`` rows of rotated activations ``x`` (R, at
    least ``keep``): one task per group of 8 rows of the weight, each
    weight decoded once for the ``R`` rows."""
    G = acc.shape[1] // 8
    if serial(G):
        for g in range(G):
            _gemv_group(data, a, keep, seq_len, total_bits, L, mult, shift,
                        qbits, table, beta, g, x, acc)
    else:
        for g in prange(G):
            _gemv_group(data, a, keep, seq_len, total_bits, L, mult, shift,
                        qbits, table, beta, g, x, acc)


@njit(cache=True)
def _gemv_group(data, a, keep, seq_len, total_bits, L, mult, shift, qbits,
                table, beta, g, x, acc):
    """Group ``g`` (rows ``8 g .. 8 g + 7``) of :func:`gemv`."""
    R = x.shape[0]
    a8 = np.zeros((R, 8), np.float32)
    dot_group(data, a, keep, seq_len, total_bits, L, mult, shift, qbits,
              table, beta, 8 * g, x, a8)
    for r in range(R):
        for lane in range(8):
            acc[r, 8 * g + lane] = a8[r, lane]


@njit(cache=True, parallel=True)
def gemm(data, a, keep, seq_len, total_bits, L, mult, shift, qbits, table, beta,
         x, C, ep, xsum, nthreads):
    """``C[m, i] = ep[0, i] <x_m, raw_i> + ep[1, i] xsum[m] + ep[2, i]`` for
    all rows ``x_m`` of the rotated activations ``x`` (M, at least ``keep``)
    and all rows ``i`` of tiles of 16 (``C`` (M, 16 T); it need not be
    initialised; ``ep`` (3, 16 T)).

    The tiles of 16 rows are split evenly between ``nthreads`` tasks; each
    walks cache blocks of ``MC`` activation rows, K tiles of ``KC``
    coordinates and its own tiles: a tile is decoded once into a 16 KiB
    buffer (:func:`decode_group`, twice 8 rows) and multiplied into every
    activation row of the cache block by register tiles of ``MR x 16``
    accumulators (:func:`nqlib.kernels.cpu.fused.tile_product`).
    """
    M = C.shape[0]
    T = C.shape[1] // 16
    sm = x.shape[1]
    nw = max(1, min(T, nthreads))
    for w in prange(nw):
        t0 = w * T // nw
        t1 = (w + 1) * T // nw
        buf = np.empty(16 * KC, np.float32)
        for mb in range(0, M, MC):
            me = min(M, mb + MC)
            for k0 in range(0, keep, KC):
                k1 = min(keep, k0 + KC)
                for t in range(t0, t1):
                    for half in range(2):
                        decode_group(data, a, keep, seq_len, total_bits, L, mult,
                                     shift, qbits, table, beta, 16 * t + 8 * half,
                                     k0, k1, buf, 8 * half, 16)
                    m0 = mb
                    while m0 < me:
                        mr = min(MR, me - m0)
                        tile_product(mr, buf, k1 - k0, x, sm, 1, k0, m0, C, 16 * t,
                                     ep, xsum, k0 == 0, k1 == keep)
                        m0 += mr


# ------------------------------------------------------------- drivers
@njit(cache=True)
def _products(x_rot, xsum, data, keep, seq_len, total_bits, L, mult, shift,
              qbits, table, beta, alpha, n_pad, norms, means, bias, gemv_rows,
              nthreads, out):
    """``out[m, i] = s_i <x_rot_m, raw_i> + mu_i xsum[m] + b_i`` (M, a) for
    rotated activations ``x_rot`` (M, at least ``keep``), ``raw_i`` the
    decoded vector ``i`` (its coordinates past ``keep`` are 0), ``s_i =
    alpha norms_i / sqrt(n_pad)`` (``alpha`` when ``norms`` is empty),
    ``mu`` the means and ``b`` the bias (empty: 0). Up to ``gemv_rows``
    rows run :func:`gemv` (at most ``GEMV_MAX_ROWS`` at a time), more rows
    :func:`gemm`, which applies the epilogue as it stores. Exported as
    :func:`products`."""
    M = x_rot.shape[0]
    a = out.shape[1]
    rows = -(-a // 16) * 16
    ep = np.zeros((3, rows), np.float32)
    inv = 1.0 / np.sqrt(n_pad)
    for i in range(a):
        ep[0, i] = (np.float32(alpha * np.float64(norms[i]) * inv)
                    if norms.shape[0] > 0 else np.float32(alpha))
        if means.shape[0] > 0:
            ep[1, i] = means[i]
        if bias.shape[0] > 0:
            ep[2, i] = bias[i]
    if M == 0:
        return
    if M > gemv_rows:
        C = out if a == rows else np.empty((M, rows), np.float32)
        gemm(data, a, keep, seq_len, total_bits, L, mult, shift, qbits, table,
             beta, x_rot, C, ep, xsum, nthreads)
        if a != rows:
            for r in range(M):
                for i in range(a):
                    out[r, i] = C[r, i]
        return
    acc = np.empty((GEMV_MAX_ROWS, 8 * (-(-a // 8))), np.float32)
    for r0 in range(0, M, GEMV_MAX_ROWS):
        R = min(GEMV_MAX_ROWS, M - r0)
        xr = np.ascontiguousarray(x_rot[r0:r0 + R])
        gemv(data, a, keep, seq_len, total_bits, L, mult, shift, qbits, table,
             beta, xr, acc[:R])
        for r in range(R):
            for i in range(a):
                out[r0 + r, i] = (ep[0, i] * acc[r, i] + ep[1, i] * xsum[r0 + r]
                                  + ep[2, i])


@njit(cache=True)
def linear(x, n_pad, signs, orth, p, center, data, keep, seq_len, total_bits, L,
           mult, shift, qbits, table, beta, alpha, norms, means, bias, gemv_rows,
           nthreads, out, x_rot, xsum):
    """``x @ W_hat.T + bias``: :func:`nqlib.kernels.cpu.fused.rotate_rows`
    (centring, padding, rotation of the rows ``x`` (M, n)) then
    :func:`products`, in one call; ``x_rot`` (at least (M, n_pad)) and
    ``xsum`` (at least (M,)) float32 are its scratch."""
    M = x.shape[0]
    x_rot = x_rot[:M]
    xsum = xsum[:M]
    rotate_rows(x, signs, orth, p, center, x_rot, xsum)
    _products(x_rot, xsum, data, keep, seq_len, total_bits, L, mult, shift, qbits,
              table, beta, alpha, n_pad, norms, means, bias, gemv_rows, nthreads,
              out)


products = _products

# serialised when numba's threading layer is not thread-safe; the two
# drivers run parallel kernels inside, so they are serialised too
guard_module(globals())
if not threadsafe():
    products = guarded(_products)
    linear = guarded(linear)
