"""Fused decode-matmul for fixed-mode nested-lattice weights on the CPU.

The weight ``W`` (``a`` rows of length ``n_pad = 8 B``) is held in the CPU
layout built by :func:`nqlib.quantizers.cpu_layout.cpu_layout` and is never
decoded to memory as a whole: the batch-1 kernel (:func:`gemv`) decodes every
block in registers inside the dot products, and the batched kernel
(:func:`gemm`) decodes a tile of 16 rows by 32 blocks (16 KiB of float32, in
L1; all blocks, up to 48, when the rows are that short) at a time and
multiplies it into every row of the batch (register tiles
of 6 x 16 accumulators), applying the per-row scale, mean term and bias as
it stores. :func:`rotate_rows` brings the activations to the coded domain
(centring, zero padding, the seeded Hadamard rotation) in float32.

Layout (per group of 8 rows ``8 g .. 8 g + 7``, per coded block ``b``)
----------------------------------------------------------------------
Row ``i`` of the weight decodes, on block ``b``, to ``beta * r / 2`` with
``r / 2 = u + c(pi) + fix e_k`` (``u`` integers in [0, 16), ``c`` a
half-integer constant, ``fix`` in {0, -q, +q}); see
:mod:`nqlib.quantizers.cpu_layout` for the derivation. One SIMD lane per row:

* ``words[g, b, l]`` (int32): ``u_0 .. u_6`` in bits ``4 j .. 4 j + 3``;
  bits 28..31 hold ``u_7`` when ``q`` is odd, and ``odd | (u_7 >> 1) << 1``
  when ``q`` is even (then ``u_7`` is odd exactly when ``u_0 + .. + u_6``
  is, so its lowest bit is not stored);
* ``nib[g, b]`` (uint32): lane ``l`` in bits ``4 l .. 4 l + 3``: the scale
  index (3 bits) and the parity ``pi`` (bit 3);
* ``kpl`` (uint8, 3 bytes per (g, b), one spare byte at the end): lane
  ``l`` in bits ``3 l .. 3 l + 2`` of the little-endian 24-bit field: ``7 -
  k``, ``k`` the coordinate the D8 parity fix moves.

Whether the fix applies (``odd``) is read from the words: when ``q`` is odd
it is the parity of ``u_0 + .. + u_7`` (the decoded block is a point of E8,
whose coordinates sum to an even number, and the fix moves the sum by the
odd ``q``); when ``q`` is even it is bit 28. The fix moves ``r_k`` towards
0, down exactly when ``u_k >= 8`` (bit 3 of ``u_k``). So a block needs 39
bits: 32 for the halves, 4 for scale and parity, 3 for ``k``.

Per block and lane the kernels therefore do: two variable shifts (fields),
two permutes (``beta`` from the scale table, ``x_k``), one more variable
shift (the sign of ``u_k``), the ``odd`` bit, and per weight one logical
``and``, one integer-to-float conversion and one fused multiply-add.

The kernels are written as LLVM vector IR (numba ``@intrinsic``): numba's
auto-vectoriser does not turn the per-lane table look-ups into AVX2
permutes. Without AVX2 the permutes fall back to selects (same results).
Word decoding (:func:`_block_fields`) is separate from the products
(:func:`_gemv_codegen`, :func:`_decode_codegen`) so that another code can
reuse the products.

No import from the rest of nqlib but the guard, the butterflies of
:mod:`nqlib.kernels.cpu.hadamard` and the E8 decoder of
:mod:`nqlib.kernels.cpu.lattice` (for :func:`layout_fields`). Arrays in,
arrays out.
Book: chapter "Kernels: CPU and GPU", label ``ch-kernels``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from nqlib.kernels.cpu.guard import guard_module, guarded, serial, threadsafe
from nqlib.kernels.cpu.hadamard import butterflies as _butterflies
from nqlib.kernels.cpu.lattice import CHUNK, decode_e8_into

#: coded blocks per K tile of the batched kernel (256 coordinates: a tile of
#: 16 rows is 16 KiB of float32)
KC_BLOCKS = 32
#: up to this many coded blocks (384 coordinates, 24 KiB of float32 per tile)
#: the whole K range is one tile, so that the output is written once
KC_WHOLE = 48
#: rows of activations per register tile of the batched kernel (6 x 16
#: accumulators) and per cache block (a multiple of MR)
MR = 6
MC = 240
#: the constant ``c(pi)`` of ``r / 2 = u + c``: -7.5 and -8 (odd q: pi = 0,
#: 1; even q: pi = 1, 0)
C_HALF = -7.5
C_WHOLE = -8.0

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
_V8I = ir.VectorType(_I32, 8)
_V8F = ir.VectorType(_F32, 8)
#: 8 float64 lanes (the coded rows' intrinsics)
V8D = ir.VectorType(ir.DoubleType(), 8)


def _avx2() -> bool:
    """Whether the code numba generates may use AVX2 permutes."""
    import llvmlite.binding as llvm
    from numba.core import config

    features = config.CPU_FEATURES
    if features is None:
        if config.CPU_NAME not in (None, "host"):
            return False          # a portable target: no host features
        features = llvm.get_host_cpu_features().flatten()
    return "+avx2" in features.split(",")


#: whether this CPU has AVX2 (the lane permutes use its vpermd / vpermps;
#: without it, a portable tree of selects)
HAVE_AVX2 = _avx2()


class Emit:
    """Small helpers around an llvmlite IR builder for 8-lane vectors (the
    intrinsics of this module and of :mod:`nqlib.kernels.cpu.coded`)."""

    def __init__(self, builder):
        self.b = builder

    @staticmethod
    def vi(vals):
        if np.isscalar(vals):
            vals = [vals] * 8
        return ir.Constant(_V8I, [ir.Constant(_I32, int(v) - (1 << 32)
                                              if int(v) >= 1 << 31 else int(v))
                                  for v in vals])

    @staticmethod
    def vf(vals):
        if np.isscalar(vals):
            vals = [vals] * 8
        return ir.Constant(_V8F, [ir.Constant(_F32, float(v)) for v in vals])

    def splat(self, val, vty):
        """``val`` in every lane of a vector of type ``vty`` (any length)."""
        undef = ir.Constant(vty, ir.Undefined)
        v = self.b.insert_element(undef, val, ir.Constant(_I32, 0))
        return self.b.shuffle_vector(
            v, undef, ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))

    def fma(self, a, x, c):
        fn = cgutils.get_or_insert_function(
            self.b.module, ir.FunctionType(_V8F, [_V8F] * 3), "llvm.fma.v8f32")
        return self.b.call(fn, [a, x, c])

    def neg(self, v):
        """Select on the sign bit: ``v < 0`` lane by lane (int vector)."""
        return self.b.icmp_signed("<", v, self.vi(0))

    def perm(self, table, idx):
        """``table[idx & 7]`` lane by lane (float or int ``table``)."""
        b = self.b
        isint = table.type == _V8I
        if HAVE_AVX2:
            vty = _V8I if isint else _V8F
            name = "llvm.x86.avx2.permd" if isint else "llvm.x86.avx2.permps"
            fn = cgutils.get_or_insert_function(
                b.module, ir.FunctionType(vty, [vty, _V8I]), name)
            return b.call(fn, [table, idx])
        # portable: a tree of selects on the three index bits
        vty = table.type
        level = [self.splat(b.extract_element(table, ir.Constant(_I32, j)), vty)
                 for j in range(8)]
        for bit in range(3):
            take = b.icmp_signed("!=", b.and_(idx, self.vi(1 << bit)), self.vi(0))
            level = [b.select(take, level[2 * i + 1], level[2 * i])
                     for i in range(len(level) // 2)]
        return level[0]

    def load_vec(self, ptr, index, vty):
        p = self.b.bitcast(self.b.gep(ptr, [index]), vty.as_pointer())
        return self.b.load(p, align=4)

    def store_vec(self, val, ptr, index, align=4):
        p = self.b.bitcast(self.b.gep(ptr, [index]), val.type.as_pointer())
        self.b.store(val, p, align=align)

    def load_i32_unaligned(self, ptr_i8, index):
        p = self.b.bitcast(self.b.gep(ptr_i8, [index]), _I32.as_pointer())
        return self.b.load(p, align=1)


def array_data(context, builder, ty, val):
    """The data pointer of the array argument ``val`` (numba type ``ty``)
    of an intrinsic."""
    return context.make_array(ty)(context, builder, val).data


def _shape(context, builder, ty, val, dim):
    return builder.extract_value(
        context.make_array(ty)(context, builder, val).shape, dim)


# ------------------------------------------------------------- word decoding
def _block_fields(e, W, nw, kw, odd_q, q32):
    """Decode the fields of one block for 8 rows (lanes).

    ``W`` the word vector, ``nw`` / ``kw`` the scalar 32-bit loads of the
    scale/parity nibbles and of the ``7 - k`` field. Returns a dict:
    ``pi_neg`` (sign bit = pi), ``kp`` (low 3 bits =
    ``7 - k``), ``fix`` (``+q``, ``-q`` or 0, float), ``u7`` (``u_7`` as an
    integer vector), ``nib`` (low 3 bits = scale index: the permute that
    reads ``beta`` ignores the others) and ``word`` (``W``). ``u_j`` for
    ``j < 7`` are read by the products from ``word`` (masked and
    converted)."""
    b = e.b
    nib = b.lshr(e.splat(nw, _V8I), e.vi([0, 4, 8, 12, 16, 20, 24, 28]))
    kp = b.lshr(e.splat(kw, _V8I), e.vi([0, 3, 6, 9, 12, 15, 18, 21]))
    qf = b.sitofp(q32, _F32)
    qv = e.splat(qf, _V8F)
    # the sign of u_k: shift nibble k's bit 3 to bit 31 (4 kp = 28 - 4 k)
    shift = e.perm(e.vi([0, 4, 8, 12, 16, 20, 24, 28]), kp)
    down = e.neg(b.shl(W, shift))
    fix = b.select(down, b.fneg(qv), qv)
    if odd_q:
        # parity of u_0 + .. + u_7: the low bits of the nibbles, summed by a
        # multiplication, end in bit 31
        odd = b.mul(b.and_(W, e.vi(0x11111111)), e.vi(0x88888888))
        u7 = b.lshr(W, e.vi(28))
    else:
        odd = b.shl(W, e.vi(3))                           # bit 28
        par = b.mul(b.and_(W, e.vi(0x01111111)), e.vi(0x88888888))
        u7 = b.or_(b.and_(b.lshr(W, e.vi(28)), e.vi(14)), b.lshr(par, e.vi(31)))
    fix = b.select(e.neg(odd), fix, e.vf(0.0))
    return dict(nib=nib, pi_neg=b.shl(nib, e.vi(28)), kp=kp, fix=fix, u7=u7,
                word=W)


def _load_block(e, pw, pn, pk, rb):
    """The word vector and the two 32-bit meta loads of block row ``rb``
    (``g * Bc + b``)."""
    b = e.b
    W = e.load_vec(pw, b.mul(rb, ir.Constant(_I64, 8)), _V8I)
    nw = b.load(b.gep(pn, [rb]), align=4)
    kw = e.load_i32_unaligned(pk, b.mul(rb, ir.Constant(_I64, 3)))
    return W, nw, kw


def _prefetch(e, ptr):
    """A read prefetch of the cache line at ``ptr`` into all levels."""
    i8p = ir.IntType(8).as_pointer()
    fn = cgutils.get_or_insert_function(
        e.b.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]),
        "llvm.prefetch.p0i8")
    e.b.call(fn, [e.b.bitcast(ptr, i8p), ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                  ir.Constant(_I32, 1)])


# -------------------------------------------------------------- batch 1
def _gemv_codegen(odd_q, R, NG, pf):
    """``acc[r, 8 gi + l] += sum_b beta <x_{r,b}, r_b / 2>`` over blocks
    ``[b0, b1)`` of the ``NG`` groups ``g .. g + NG - 1`` (one part: one
    ``q`` and one scale table), for the ``R`` rows of activations whose
    tiles are ``xs[r]``, ``xr[r]``, ``xc[r]`` (see
    :func:`gemv_activations`): a block's fields and converted ``u_j`` are
    shared by the ``R`` rows, and the broadcast activations by the ``NG``
    groups. Each group's words and fields are prefetched ahead (``pf = 0``:
    not at all): for rows of up to ``GEMV_PASS_AHEAD`` blocks, the same
    block of the groups ``NG`` further on, which the next pass decodes;
    for longer rows, ``pf`` blocks ahead in the same group."""

    def codegen(context, builder, sig, args):
        t = sig.args
        e = Emit(builder)
        (pw, pn, pk, pxs, pxr, pxc, ptab, q, g, b0, b1,
         pacc) = array_pointers(context, builder, sig, args)
        Bc = _shape(context, builder, t[0], args[0], 1)
        coded = _shape(context, builder, t[3], args[3], 1)
        tabv = e.load_vec(ptab, ir.Constant(_I64, 0), _V8F)
        q32 = builder.trunc(q, _I32)
        accp = builder.bitcast(pacc, _V8F.as_pointer())
        slots = {}
        for r in range(R):
            for gi in range(NG):
                slot = cgutils.alloca_once(builder, _V8F)
                at = ir.Constant(_I32, NG * r + gi)
                builder.store(builder.load(builder.gep(accp, [at]), align=4), slot)
                slots[r, gi] = slot
        # per row of activations: its tiles (row strides 8 coded, 2 coded)
        c8 = builder.mul(coded, ir.Constant(_I64, 8))
        c2 = builder.mul(coded, ir.Constant(_I64, 2))
        rxs = [builder.gep(pxs, [builder.mul(c8, ir.Constant(_I64, r))])
               for r in range(R)]
        rxr = [builder.gep(pxr, [builder.mul(c8, ir.Constant(_I64, r))])
               for r in range(R)]
        rxc = [builder.gep(pxc, [builder.mul(c2, ir.Constant(_I64, r))])
               for r in range(R)]
        row0 = [builder.mul(builder.add(g, ir.Constant(_I64, gi)), Bc)
                for gi in range(NG)]
        one = ir.Constant(_I64, 1)
        short = builder.icmp_signed("<=", Bc, ir.Constant(_I64, GEMV_PASS_AHEAD))
        dist = builder.select(short, builder.mul(Bc, ir.Constant(_I64, NG)),
                              ir.Constant(_I64, pf))
        with cgutils.for_range_slice(builder, b0, b1, one, inc=True) as (blk, _):
            b8 = builder.mul(blk, ir.Constant(_I64, 8))
            b2 = builder.mul(blk, ir.Constant(_I64, 2))
            fs, betas, pis, us = [], [], [], []
            for gi in range(NG):
                if pf:
                    # the words and fields of the same block in the groups
                    # that the next pass decodes, when rows are short, else
                    # pf blocks ahead (a prefetch past the end of the arrays
                    # is harmless)
                    ahead = builder.add(builder.add(row0[gi], blk), dist)
                    _prefetch(e, builder.gep(pw, [builder.mul(ahead,
                                                              ir.Constant(_I64, 8))]))
                    _prefetch(e, builder.gep(pn, [ahead]))
                    _prefetch(e, builder.gep(pk, [builder.mul(ahead,
                                                              ir.Constant(_I64, 3))]))
                W, nw, kw = _load_block(e, pw, pn, pk, builder.add(row0[gi], blk))
                f = _block_fields(e, W, nw, kw, odd_q, q32)
                fs.append(f)
                betas.append(e.perm(tabv, f["nib"]))
                pis.append(e.neg(f["pi_neg"]))
                # u_j 2^(4j) (j < 7) and u_7, shared by the rows; x_j comes
                # pre-scaled by 2^(-4j) (exact scalings)
                us.append([builder.sitofp(builder.and_(W, e.vi(15 << (4 * j))),
                                          _V8F) for j in range(7)]
                          + [builder.sitofp(f["u7"], _V8F)])
            for r in range(R):
                # c(pi) X: xc[r, b] = (C_HALF X, C_WHOLE X)
                xa = e.splat(builder.load(builder.gep(rxc[r], [b2])), _V8F)
                xb = e.splat(builder.load(builder.gep(rxc[r], [builder.add(b2, one)])),
                             _V8F)
                pi1, pi0 = (xb, xa) if odd_q else (xa, xb)
                xrv = e.load_vec(rxr[r], b8, _V8F)                  # x reversed
                # two chains per group: base + u_0 x_0 + u_2 x_2 + ... and
                # fix x_k + u_1 x_1 + ...
                p = []
                for gi in range(NG):
                    xk = e.perm(xrv, fs[gi]["kp"])
                    p.append([builder.select(pis[gi], pi1, pi0),
                              builder.fmul(fs[gi]["fix"], xk)])
                for j in range(8):
                    xj = e.splat(builder.load(builder.gep(
                        rxs[r], [builder.add(b8, ir.Constant(_I64, j))])), _V8F)
                    for gi in range(NG):
                        p[gi][j % 2] = e.fma(us[gi][j], xj, p[gi][j % 2])
                for gi in range(NG):
                    s_ = builder.fadd(p[gi][0], p[gi][1])
                    builder.store(e.fma(s_, betas[gi], builder.load(slots[r, gi])),
                                  slots[r, gi])
        for r in range(R):
            for gi in range(NG):
                builder.store(builder.load(slots[r, gi]),
                              builder.gep(accp, [ir.Constant(_I32, NG * r + gi)]),
                              align=4)
        return context.get_dummy_value()

    return codegen


#: most rows of activations the batch-1 kernel takes in one pass
GEMV_MAX_ROWS = 4
#: blocks ahead at which the batch-1 kernel prefetches each group's words
#: and fields: a layer read from memory (not from the last-level cache, as
#: in a model too large for it) measured about 5% faster with 16 than
#: without, on 4096 x 4096 (from cache it made no measurable difference)
GEMV_PREFETCH = 16
#: rows of up to this many blocks (2048 coordinates) are prefetched one
#: pass ahead instead: a pass over short rows ends before a prefetch a
#: fixed distance ahead in the same rows would be of use, so the start of
#: every pass waited for memory. Measured on one thread, layers read from
#: memory (many layers in turn, as in a model): 576 x 1536 59 against 78
#: us, 1536 x 576 57 against 63 us, 2048 x 2048 265 against 277 us; with
#: the layer in cache no change beyond noise, and at 4096 coordinates
#: the fixed distance was 1-5% faster
GEMV_PASS_AHEAD = 256


def _gemv_intrinsic(odd_q, R, NG=1, pf=None):
    @intrinsic
    def _gemv_blocks(typingctx, words, nib, kpl, xs, xr, xc, tab, q, g, b0, b1,
                     acc):
        sig = types.void(words, nib, kpl, xs, xr, xc, tab, types.int64,
                         types.int64, types.int64, types.int64, acc)
        return sig, _gemv_codegen(odd_q, R, NG,
                                  GEMV_PREFETCH if pf is None else pf)

    return _gemv_blocks


#: groups of 8 rows of the weight that one pass of the batch-1 kernel
#: decodes together, per number of rows of activations (1, 2, 3, 4): the
#: broadcast activations are shared by ``8 NG`` rows of the weight. Four
#: groups at batch 1 and two at batch 2 were the fastest measured (4096 x
#: 4096, one thread, an AVX-512 CPU: 0.92 ms against 0.99 ms for two groups
#: and 1.11 ms for one; the same CPU compiling for AVX2 only: 1.12, 1.65 and
#: 1.88 ms); eight groups no longer fit in the vector registers.
GEMV_GROUPS = (4, 2, 1, 1)
_gemv_odd1, _gemv_odd2, _gemv_odd3, _gemv_odd4 = (
    _gemv_intrinsic(True, r, GEMV_GROUPS[r - 1]) for r in range(1, 5))
_gemv_even1, _gemv_even2, _gemv_even3, _gemv_even4 = (
    _gemv_intrinsic(False, r, GEMV_GROUPS[r - 1]) for r in range(1, 5))
# one group at a time, for the groups left over: only the row counts that
# decode several groups per pass leave groups over (_gemv_single)
assert all(ng == 1 for ng in GEMV_GROUPS[2:])
_gemv_odd1_1, _gemv_odd2_1 = (_gemv_intrinsic(True, r, 1) for r in (1, 2))
_gemv_even1_1, _gemv_even2_1 = (_gemv_intrinsic(False, r, 1) for r in (1, 2))
#: the one-row GEMV over the blocks of an odd-q part, ``GEMV_GROUPS[0]``
#: groups at a time (the kernels' inner loop; chapter ``ch-kernels``
#: compiles it to count its instructions)
gemv_odd = _gemv_odd1


# ------------------------------------------------------------- batched
def _decode_codegen(odd_q):
    """Decode blocks ``[b0, b1)`` of group ``g`` into the tile ``buf``: the
    weight of coordinate ``8 (b - kb0) + j`` of row ``8 g + l`` goes to
    ``buf[16 (8 (b - kb0) + j) + lane0 + l]``."""

    def codegen(context, builder, sig, args):
        t = sig.args
        e = Emit(builder)
        (pw, pn, pk, ptab, q, g, b0, b1, pbuf, lane0,
         kb0) = array_pointers(context, builder, sig, args)
        Bc = _shape(context, builder, t[0], args[0], 1)
        tabv = e.load_vec(ptab, ir.Constant(_I64, 0), _V8F)
        q32 = builder.trunc(q, _I32)
        c_pi1, c_pi0 = ((e.vf(C_WHOLE), e.vf(C_HALF)) if odd_q
                        else (e.vf(C_HALF), e.vf(C_WHOLE)))
        row0 = builder.mul(g, Bc)
        one = ir.Constant(_I64, 1)
        with cgutils.for_range_slice(builder, b0, b1, one, inc=True) as (blk, _):
            W, nw, kw = _load_block(e, pw, pn, pk, builder.add(row0, blk))
            f = _block_fields(e, W, nw, kw, odd_q, q32)
            beta = e.perm(tabv, f["nib"])
            c = builder.select(e.neg(f["pi_neg"]), c_pi1, c_pi0)
            shift = builder.fmul(beta, c)                  # beta c
            shift_k = e.fma(beta, f["fix"], shift)         # beta (c + fix)
            kp = builder.and_(f["kp"], e.vi(7))
            out0 = builder.add(builder.mul(builder.sub(blk, kb0),
                                           ir.Constant(_I64, 128)), lane0)
            for j in range(8):
                if j < 7:
                    uj = builder.and_(builder.lshr(W, e.vi(4 * j)), e.vi(15))
                else:
                    uj = f["u7"]
                at_k = builder.icmp_signed("==", kp, e.vi(7 - j))
                w = e.fma(builder.sitofp(uj, _V8F), beta,
                          builder.select(at_k, shift_k, shift))
                e.store_vec(w, pbuf, builder.add(out0, ir.Constant(_I64, 16 * j)))
        return context.get_dummy_value()

    return codegen


def _decode_intrinsic(odd_q):
    @intrinsic
    def _decode_blocks(typingctx, words, nib, kpl, tab, q, g, b0, b1, buf,
                       lane0, kb0):
        sig = types.void(words, nib, kpl, tab, types.int64, types.int64,
                         types.int64, types.int64, buf, types.int64, types.int64)
        return sig, _decode_codegen(odd_q)

    return _decode_blocks


_decode_odd = _decode_intrinsic(True)
_decode_even = _decode_intrinsic(False)


def _tile_codegen(mr):
    """``C[m0 + r, n0 : n0 + 16] += sum_kk buf[kk, :] x[m0 + r, k0 + kk]``
    for ``r < mr`` and ``kk < nk``, where ``x[m, k]`` is the float at flat
    index ``m sm + k sk`` of the array ``x`` (the activations as rows: ``sk
    = 1``; each row is read along its cache lines): a register tile of ``mr
    x 16`` accumulators, two weight loads and ``mr`` broadcasts per
    coordinate.

    With ``first`` the sum is stored instead of added (``C`` need not be
    initialised); with ``last`` the epilogue follows: ``C = ep[0] C + ep[1]
    xsum[m] + ep[2]`` (per column: scale, mean, bias)."""

    def codegen(context, builder, sig, args):
        buf, nk, x, sm, sk, k0, m0, C, n0, ep, xsum, first, last = args
        t = sig.args
        e = Emit(builder)
        pbuf = array_data(context, builder, t[0], buf)
        px = array_data(context, builder, t[2], x)
        pc = array_data(context, builder, t[7], C)
        ldc = _shape(context, builder, t[7], C, 1)
        rows = [builder.gep(px, [builder.add(
            builder.mul(builder.add(m0, ir.Constant(_I64, r)), sm),
            builder.mul(k0, sk))]) for r in range(mr)]
        slots = [[cgutils.alloca_once_value(builder, e.vf(0.0)) for _ in range(2)]
                 for _ in range(mr)]
        zero = ir.Constant(_I64, 0)
        one = ir.Constant(_I64, 1)
        with cgutils.for_range_slice(builder, zero, nk, one, inc=True) as (kk, _):
            w0 = e.load_vec(pbuf, builder.mul(kk, ir.Constant(_I64, 16)), _V8F)
            w1 = e.load_vec(pbuf, builder.add(builder.mul(kk, ir.Constant(_I64, 16)),
                                              ir.Constant(_I64, 8)), _V8F)
            kks = builder.mul(kk, sk)
            for r in range(mr):
                xv = e.splat(builder.load(builder.gep(rows[r], [kks])), _V8F)
                for half, w in enumerate((w0, w1)):
                    s = slots[r][half]
                    builder.store(e.fma(w, xv, builder.load(s)), s)
        pep = array_data(context, builder, t[9], ep)
        pxs = array_data(context, builder, t[10], xsum)
        lde = _shape(context, builder, t[9], ep, 1)
        is_first = builder.icmp_signed("!=", first, zero)
        is_last = builder.icmp_signed("!=", last, zero)
        col = [[e.load_vec(pep, builder.add(builder.add(builder.mul(
            ir.Constant(_I64, f), lde), n0), ir.Constant(_I64, 8 * half)), _V8F)
            for half in range(2)] for f in range(3)]
        for r in range(mr):
            mr_ = builder.add(m0, ir.Constant(_I64, r))
            row = builder.add(builder.mul(mr_, ldc), n0)
            xs = e.splat(builder.load(builder.gep(pxs, [mr_])), _V8F)
            for half in range(2):
                at = builder.add(row, ir.Constant(_I64, 8 * half))
                acc = builder.load(slots[r][half])
                old = e.load_vec(pc, at, _V8F)   # unused (any bits) when first
                v = builder.select(is_first, acc, builder.fadd(old, acc))
                tail = e.fma(col[1][half], xs, col[2][half])
                v = builder.select(is_last, e.fma(col[0][half], v, tail), v)
                e.store_vec(v, pc, at)
        return context.get_dummy_value()

    return codegen


def _tile_intrinsic(mr):
    @intrinsic
    def _tile(typingctx, buf, nk, x, sm, sk, k0, m0, C, n0, ep, xsum, first,
              last):
        sig = types.void(buf, types.int64, x, types.int64, types.int64,
                         types.int64, types.int64, C, types.int64, ep, xsum,
                         types.int64, types.int64)
        return sig, _tile_codegen(mr)

    return _tile


_tile1, _tile2, _tile3, _tile4, _tile5, _tile6 = (_tile_intrinsic(r)
                                                  for r in range(1, MR + 1))


def _butterflies4_intrinsic(scaled):
    def _bf4(typingctx, arr, off, span, scale):
        sig = types.void(arr, types.int64, types.int64, types.float32)

        def codegen(context, builder, signature, args):
            arr_v, off, span, scale = args
            e = Emit(builder)
            b = builder
            ptr = b.gep(array_data(context, b, signature.args[0], arr_v), [off])
            ps = [b.gep(ptr, [b.mul(span, ir.Constant(_I64, k))])
                  for k in range(4)]
            sv = e.splat(scale, _V8F)
            nvec = b.sdiv(span, ir.Constant(_I64, 8))
            zero = ir.Constant(_I64, 0)
            one = ir.Constant(_I64, 1)
            with cgutils.for_range_slice(b, zero, nvec, one, inc=True) as (i, _):
                at = b.mul(i, ir.Constant(_I64, 8))
                v = [e.load_vec(q, at, _V8F) for q in ps]
                # stage of span ``span``, then of span ``2 span``: the same
                # operations, in the same order, as two passes of
                # _butterflies
                t = [b.fadd(v[0], v[1]), b.fsub(v[0], v[1]),
                     b.fadd(v[2], v[3]), b.fsub(v[2], v[3])]
                u = [b.fadd(t[0], t[2]), b.fadd(t[1], t[3]),
                     b.fsub(t[0], t[2]), b.fsub(t[1], t[3])]
                for k in range(4):
                    val = b.fmul(u[k], sv) if scaled else u[k]
                    e.store_vec(val, ps[k], at)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(_bf4)


#: two butterfly stages (spans ``span`` and ``2 span``, ``span`` a multiple
#: of 8) on the four runs ``arr.flat[off + k span : off + (k + 1) span]``
#: in one pass, optionally times ``scale`` as they are stored
#: (``_butterflies4(arr, off, span, scale)``; the scale is ignored by the
#: unscaled one)
_butterflies4 = _butterflies4_intrinsic(False)
_butterflies4_scaled = _butterflies4_intrinsic(True)


@intrinsic
def _hadamard8(typingctx, arr, off, count):
    """The first three butterfly stages (spans 1, 2, 4) of a Walsh-Hadamard
    transform on each run of 8 floats of ``arr.flat[off : off + count]``
    (``count`` a multiple of 8), in registers: per stage a lane shuffle, an
    add, a subtract and a select. The same operations, in the same order, as
    the butterflies ``a, b = a + b, a - b`` on each pair."""
    sig = types.void(arr, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        arr_v, off, count = args
        e = Emit(builder)
        ptr = builder.gep(array_data(context, builder, signature.args[0], arr_v), [off])
        nvec = builder.sdiv(count, ir.Constant(_I64, 8))
        zero = ir.Constant(_I64, 0)
        one = ir.Constant(_I64, 1)
        with cgutils.for_range_slice(builder, zero, nvec, one, inc=True) as (i, _):
            at = builder.mul(i, ir.Constant(_I64, 8))
            v = e.load_vec(ptr, at, _V8F)
            for span in (1, 2, 4):
                t = builder.shuffle_vector(v, v, ir.Constant(
                    _V8I, [j ^ span for j in range(8)]))
                low = ir.Constant(ir.VectorType(ir.IntType(1), 8),
                                  [(j & span) == 0 for j in range(8)])
                # low lane j: v_j + v_(j+span); high lane: v_(j-span) - v_j
                v = builder.select(low, builder.fadd(v, t), builder.fsub(t, v))
            e.store_vec(v, ptr, at)
        return context.get_dummy_value()

    return sig, codegen


def _h8_stages(e, v):
    """Butterfly stages of spans 1, 2, 4 on the 8 lanes of ``v``."""
    b = e.b
    for span in (1, 2, 4):
        t = b.shuffle_vector(v, v, ir.Constant(_V8I, [j ^ span for j in range(8)]))
        low = ir.Constant(ir.VectorType(ir.IntType(1), 8),
                          [(j & span) == 0 for j in range(8)])
        # low lane j: v_j + v_(j+span); high lane: v_(j-span) - v_j
        v = b.select(low, b.fadd(v, t), b.fsub(t, v))
    return v


@intrinsic
def _mix3_hadamard8(typingctx, arr, orth, off, count):
    """For the rotation with an odd factor ``O_3``: on each window of 24
    floats of ``arr.flat[off : off + count]`` (8 groups of 3 coordinates),
    ``O_3`` within every group, then the Hadamard stages of spans 1, 2, 4
    across the 8 groups, all in registers (the window is transposed to three
    8-lane vectors and back). Per coordinate the same float32 operations, in
    the same order, as the plain loops: ``sum_c O[a, c] y_c`` from 0 in
    increasing ``c`` (no fused multiply-add), then the butterflies."""
    sig = types.void(arr, orth, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        arr_v, orth_v, off, count = args
        e = Emit(builder)
        b = builder
        ptr = b.gep(array_data(context, b, signature.args[0], arr_v), [off])
        O = _splat_orth(e, array_data(context, b, signature.args[1], orth_v))
        v24 = ir.VectorType(_F32, 24)
        nwin = b.sdiv(count, ir.Constant(_I64, 24))
        zero = ir.Constant(_I64, 0)
        one = ir.Constant(_I64, 1)
        with cgutils.for_range_slice(b, zero, nwin, one, inc=True) as (w, _):
            at = b.mul(w, ir.Constant(_I64, 24))
            v = [e.load_vec(ptr, b.add(at, ir.Constant(_I64, 8 * k)), _V8F)
                 for k in range(3)]
            lo = b.shuffle_vector(v[0], v[1], ir.Constant(_V8I, []) if False else
                                  ir.Constant(ir.VectorType(_I32, 16), list(range(16))))
            hi = b.shuffle_vector(v[2], v[2], ir.Constant(
                ir.VectorType(_I32, 16), list(range(8)) + [0] * 8))
            whole = b.shuffle_vector(lo, hi, ir.Constant(
                ir.VectorType(_I32, 24), list(range(24))))
            cols = [b.shuffle_vector(whole, whole, ir.Constant(
                _V8I, [3 * i + c for i in range(8)])) for c in range(3)]
            mixed = []
            for a in range(3):
                acc = e.vf(0.0)
                for c in range(3):
                    acc = b.fadd(acc, b.fmul(O[a][c], cols[c]))
                mixed.append(_h8_stages(e, acc))
            ab = b.shuffle_vector(mixed[0], mixed[1], ir.Constant(
                ir.VectorType(_I32, 16), list(range(16))))
            cc = b.shuffle_vector(mixed[2], mixed[2], ir.Constant(
                ir.VectorType(_I32, 16), list(range(8)) + [0] * 8))
            back = b.shuffle_vector(ab, cc, ir.Constant(
                ir.VectorType(_I32, 24), list(range(24))))
            # element 3 i + c of the window is lane i of column c
            out = b.shuffle_vector(back, back, ir.Constant(
                ir.VectorType(_I32, 24), [8 * (j % 3) + j // 3 for j in range(24)]))
            for k in range(3):
                part = b.shuffle_vector(out, out, ir.Constant(
                    _V8I, list(range(8 * k, 8 * k + 8))))
                e.store_vec(part, ptr, b.add(at, ir.Constant(_I64, 8 * k)))
            del v24
        return context.get_dummy_value()

    return sig, codegen


#: floats of :func:`_mix3_hadamard8_x8`'s step: eight windows of 24
MIX3_STEP = 192


def _mix3_x8_codegen(e, ptr, O, count, vty=_V8F):
    """The loop of :func:`_mix3_hadamard8_x8` on the floats at ``ptr``
    (``O`` the splatted factor, :func:`_splat_orth`; ``vty`` the 8-lane
    vector type: float32, or float64 for :func:`mix3_butterflies_f64`)."""
    b = e.b
    vzero = ir.Constant(vty, [ir.Constant(vty.element, 0.0)] * 8)
    nstep = b.sdiv(count, ir.Constant(_I64, MIX3_STEP))
    zero = ir.Constant(_I64, 0)
    one = ir.Constant(_I64, 1)
    with cgutils.for_range_slice(b, zero, nstep, one, inc=True) as (s, _):
        at = b.mul(s, ir.Constant(_I64, MIX3_STEP))
        # vector 3 w + k holds floats 8 k .. 8 k + 7 of window w
        v = [e.load_vec(ptr, b.add(at, ir.Constant(_I64, 8 * k)), vty)
             for k in range(24)]
        # E[j], lane w: float j of window w
        E = []
        for k in range(3):
            E += _transposed8(b, [v[3 * w + k] for w in range(8)])
        # O_3 within every group i (coordinates 3 i + c), the sum from 0 in
        # increasing c, products and sums rounded apart
        M = []
        for i in range(8):
            for a in range(3):
                acc = vzero
                for c in range(3):
                    acc = b.fadd(acc, b.fmul(O[a][c], E[3 * i + c]))
                M.append(acc)
        # butterflies of spans 1, 2, 4 across i: (lo, hi) -> (lo + hi,
        # lo - hi), as _h8_stages forms them
        for span in (1, 2, 4):
            for i in range(8):
                if i & span:
                    continue
                for a in range(3):
                    lo, hi = M[3 * i + a], M[3 * (i + span) + a]
                    M[3 * i + a] = b.fadd(lo, hi)
                    M[3 * (i + span) + a] = b.fsub(lo, hi)
        for k in range(3):
            rows = _transposed8(b, M[8 * k:8 * k + 8])
            for w in range(8):
                e.store_vec(rows[w], ptr,
                            b.add(at, ir.Constant(_I64, 24 * w + 8 * k)))


def _splat_orth(e, po, vty=_V8F, transposed=False):
    """``O[a][c]``: the nine entries of the (3, 3) factor at ``po`` (of
    ``vty``'s element type; ``transposed``: ``po`` holds ``O^T``), each
    splatted to the 8 lanes of ``vty``."""
    b = e.b
    return [[e.splat(b.load(b.gep(po, [ir.Constant(
        _I64, 3 * c + a if transposed else 3 * a + c)])), vty)
        for c in range(3)] for a in range(3)]


@intrinsic
def _mix3_hadamard8_x8(typingctx, arr, orth, off, count):
    """:func:`_mix3_hadamard8` on ``arr.flat[off : off + count]``, ``count``
    a multiple of :data:`MIX3_STEP`, eight windows of 24 floats at a time,
    one window per SIMD lane: the 8 x 24 block is transposed (three 8 x 8
    transposes, :func:`_transposed8`) into 24 vectors, coordinate ``3 i +
    c`` of every window in one, where ``O_3`` and the butterflies of spans
    1, 2, 4 (across ``i``) are operations on whole vectors -- no shuffle
    inside a stage -- and transposed back. Per coordinate the same float32
    operations, in the same order, as :func:`_mix3_hadamard8`: the same
    bits."""
    if not (c_array(arr, types.float32) and c_array(orth, types.float32)):
        return None                 # a typing error
    sig = types.void(arr, orth, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        arr_v, orth_v, off, count = args
        e = Emit(builder)
        ptr = builder.gep(array_data(context, builder, signature.args[0], arr_v),
                          [off])
        O = _splat_orth(e, array_data(context, builder, signature.args[1], orth_v))
        _mix3_x8_codegen(e, ptr, O, count)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def mix3_butterflies_f64(typingctx, arr, orth_t, count):
    """The float64 twin of :func:`_mix3_hadamard8_x8` for the coded rows of
    activations (:func:`nqlib.kernels.cpu.coded.coded_rows_into`, ``m =
    3``): on ``arr[:count]`` (float64, ``count`` a multiple of
    :data:`MIX3_STEP`), each group of 3 coordinates times ``orth_t``
    (``O^T``: output ``c`` is ``sum_t y_t orth_t[t, c]`` from 0.0 in
    increasing ``t``, products and sums rounded apart), then the butterflies
    of spans 1, 2 and 4 groups; eight windows of 24 values at a time, one
    per SIMD lane. The operations of the coded rows' scalar loops, in their
    order: the same bits."""
    if not (c_array(arr, types.float64) and arr.ndim == 1
            and c_array(orth_t, types.float64) and orth_t.ndim == 2):
        return None                 # a typing error
    sig = types.void(arr, orth_t, types.int64)

    def codegen(context, builder, signature, args):
        pa, po, count = array_pointers(context, builder, signature, args)
        e = Emit(builder)
        O = _splat_orth(e, po, V8D, transposed=True)
        _mix3_x8_codegen(e, pa, O, count, V8D)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, fastmath={"reassoc", "nsz"})
def _row_sum(x, r):
    """``sum(x[r])`` in float32, in any order (vectorised: a function of its
    own, not inlined into numba's IR, so that its flags survive)."""
    s = np.float32(0.0)
    for i in range(x.shape[1]):
        s += x[r, i]
    return s


@njit(cache=True, inline="always")
def _hadamard_run(y, off, p):
    """In place, ``H_p`` on ``y[off : off + p]`` (``p`` a power of two, at
    least 8), unscaled: the butterflies of spans 1, 2, 4 in registers, the
    longer ones on runs of 8 lanes; stages in increasing span (as
    :func:`nqlib.kernels.cpu.hadamard.fwht_rows`)."""
    _hadamard8(y, off, p)
    hh = 8
    while hh < p:
        for start in range(off, off + p, 2 * hh):
            _butterflies(y, start, start + hh, hh)
        hh *= 2


@njit(cache=True, inline="always")
def _stages_from(y, off, span, length, scale, scaled):
    """In place on ``y[off : off + length]``, the butterfly stages of spans
    ``span, 2 span, ... < length`` (``span`` a multiple of 8), in increasing
    span, two per pass over the data (one alone first when their number is
    odd); with ``scaled`` the result is multiplied by ``scale`` (as the last
    pass stores, or in a pass of its own when no two stages are left)."""
    k = 0
    s = span
    while s < length:
        k += 1
        s *= 2
    s = span
    if k % 2 == 1:
        for start in range(off, off + length, 2 * s):
            _butterflies(y, start, start + s, s)
        s *= 2
        k -= 1
    if scaled and k == 0:
        for i in range(off, off + length):
            y[i] *= scale
    while k > 0:
        if scaled and k == 2:
            for start in range(off, off + length, 4 * s):
                _butterflies4_scaled(y, start, s, scale)
        else:
            for start in range(off, off + length, 4 * s):
                _butterflies4(y, start, s, scale)
        s *= 4
        k -= 2


# ------------------------------------------------------------- drivers
@njit(cache=True)
def gemv_activations(x_rot, coded, xs, xr, xc):
    """The tiles of rows of rotated activations ``x_rot`` (R, >= 8 coded)
    that :func:`gemv` reads, for ``coded`` blocks: ``xs[r, b, j] =
    x_{8b+j} 2^(-4j)`` (``j < 7``; ``x`` itself at ``j = 7``), ``xr[r, b, j]
    = x_{8b+7-j}`` and ``xc[r, b] = (C_HALF X_b, C_WHOLE X_b)`` with ``X_b``
    the block sum."""
    for r in range(x_rot.shape[0]):
        for b in range(coded):
            s = np.float32(0.0)
            for j in range(8):
                v = x_rot[r, 8 * b + j]
                s += v
                xr[r, b, 7 - j] = v
                xs[r, b, j] = v * np.float32(2.0 ** (-4 * j)) if j < 7 else v
            xc[r, b, 0] = np.float32(C_HALF) * s
            xc[r, b, 1] = np.float32(C_WHOLE) * s


@njit(cache=True)
def _gemv_part(odd, R, words, nib, kpl, xs, xr, xc, tab, q, g, b0, b1, acc):
    """Blocks ``[b0, b1)`` of groups ``g .. g + GEMV_GROUPS[R - 1] - 1``
    into ``acc`` (R, 8 GEMV_GROUPS[R - 1])."""
    if odd:
        if R == 1:
            _gemv_odd1(words, nib, kpl, xs, xr, xc, tab, q, g, b0, b1, acc)
        elif R == 2:
            _gemv_odd2(words, nib, kpl, xs, xr, xc, tab, q, g, b0, b1, acc)
        elif R == 3:
            _gemv_odd3(words, nib, kpl, xs, xr, xc, tab, q, g, b0, b1, acc)
        else:
            _gemv_odd4(words, nib, kpl, xs, xr, xc, tab, q, g, b0, b1, acc)
    else:
        if R == 1:
            _gemv_even1(words, nib, kpl, xs, xr, xc, tab, q, g, b0, b1, acc)
        elif R == 2:
            _gemv_even2(words, nib, kpl, xs, xr, xc, tab, q, g, b0, b1, acc)
        elif R == 3:
            _gemv_even3(words, nib, kpl, xs, xr, xc, tab, q, g, b0, b1, acc)
        else:
            _gemv_even4(words, nib, kpl, xs, xr, xc, tab, q, g, b0, b1, acc)


@njit(cache=True)
def _gemv_single(odd, R, words, nib, kpl, xs, xr, xc, tab, q, g, b0, b1, acc):
    """Blocks ``[b0, b1)`` of group ``g`` alone into ``acc`` (R, 8). Three
    or four rows of activations take one group per pass anyway
    (``GEMV_GROUPS``), so their kernels serve."""
    if R >= 3:
        _gemv_part(odd, R, words, nib, kpl, xs, xr, xc, tab, q, g, b0, b1, acc)
    elif odd:
        if R == 1:
            _gemv_odd1_1(words, nib, kpl, xs, xr, xc, tab, q, g, b0, b1, acc)
        else:
            _gemv_odd2_1(words, nib, kpl, xs, xr, xc, tab, q, g, b0, b1, acc)
    else:
        if R == 1:
            _gemv_even1_1(words, nib, kpl, xs, xr, xc, tab, q, g, b0, b1, acc)
        else:
            _gemv_even2_1(words, nib, kpl, xs, xr, xc, tab, q, g, b0, b1, acc)


@njit(cache=True, parallel=True)
def gemv(words, nib, kpl, tab, q_hi, q_lo, h, xs, xr, xc, acc):
    """``acc[r, i] = <x_r, raw_i>`` for the ``R <= GEMV_MAX_ROWS`` rows of
    activations whose tiles are ``xs``, ``xr``, ``xc`` and every stored row
    ``i`` (``acc`` (R, 8 G)): blocks ``[0, h)`` with ``q_hi`` and
    ``tab[0]``, ``[h, Bc)`` with ``q_lo`` and ``tab[1]``. Each block is
    decoded once for the ``R`` rows; one task per ``GEMV_GROUPS[R - 1]``
    groups of 8 rows of the weight (the broadcast activations shared by
    their rows), the groups left over one at a time."""
    G = words.shape[0]
    ng = GEMV_GROUPS[xs.shape[0] - 1]
    multi = G // ng
    tasks = multi + G - ng * multi
    if serial(tasks):
        for t in range(tasks):
            _gemv_task(t, multi, ng, words, nib, kpl, tab, q_hi, q_lo, h, xs,
                       xr, xc, acc)
    else:
        for t in prange(tasks):
            _gemv_task(t, multi, ng, words, nib, kpl, tab, q_hi, q_lo, h, xs,
                       xr, xc, acc)


@njit(cache=True)
def _gemv_task(t, multi, ng, words, nib, kpl, tab, q_hi, q_lo, h, xs, xr, xc,
               acc):
    """Task ``t`` of :func:`gemv`: ``ng`` groups from group ``ng t`` (``t <
    multi``), else one group after them."""
    Bc = words.shape[1]
    R = xs.shape[0]
    whole = t < multi
    g = ng * t if whole else ng * multi + (t - multi)
    width = ng if whole else 1
    a8 = np.zeros((R, 8 * width), np.float32)
    for part in range(2):
        b0, b1 = (0, h) if part == 0 else (h, Bc)
        if b1 <= b0:
            continue
        q = q_hi if part == 0 else q_lo
        if whole:
            _gemv_part(q & 1, R, words, nib, kpl, xs, xr, xc, tab[part], q,
                       g, b0, b1, a8)
        else:
            _gemv_single(q & 1, R, words, nib, kpl, xs, xr, xc, tab[part], q,
                         g, b0, b1, a8)
    for r in range(R):
        for lane in range(8 * width):
            acc[r, 8 * g + lane] = a8[r, lane]


@njit(cache=True)
def _decode_part(words, nib, kpl, tab, q, g, b0, b1, buf, lane0, kb0):
    if q & 1:
        _decode_odd(words, nib, kpl, tab, q, g, b0, b1, buf, lane0, kb0)
    else:
        _decode_even(words, nib, kpl, tab, q, g, b0, b1, buf, lane0, kb0)


@njit(cache=True)
def _tile(mr, buf, nk, x, sm, sk, k0, m0, C, n0, ep, xsum, first, last):
    if mr == 6:
        _tile6(buf, nk, x, sm, sk, k0, m0, C, n0, ep, xsum, first, last)
    elif mr == 5:
        _tile5(buf, nk, x, sm, sk, k0, m0, C, n0, ep, xsum, first, last)
    elif mr == 4:
        _tile4(buf, nk, x, sm, sk, k0, m0, C, n0, ep, xsum, first, last)
    elif mr == 3:
        _tile3(buf, nk, x, sm, sk, k0, m0, C, n0, ep, xsum, first, last)
    elif mr == 2:
        _tile2(buf, nk, x, sm, sk, k0, m0, C, n0, ep, xsum, first, last)
    else:
        _tile1(buf, nk, x, sm, sk, k0, m0, C, n0, ep, xsum, first, last)


@njit(cache=True)
def tile_product(mr, buf, nk, x, sm, sk, k0, m0, C, n0, ep, xsum, first, last):
    """The register tile of the batched kernel, for any decoder that fills
    the same buffer: ``C[m0 + r, n0 : n0 + 16] (+)= sum_kk buf[16 kk + l]
    x[m0 + r, k0 + kk]`` for ``r < mr <= MR``, ``kk < nk`` (``x[m, k]`` the
    float at flat index ``m sm + k sk``); ``first``: store instead of add;
    ``last``: then ``C = ep[0] C + ep[1] xsum[m] + ep[2]`` per column (see
    :func:`_tile_codegen`). Used by :mod:`nqlib.kernels.cpu.trellis_fused`."""
    _tile(mr, buf, nk, x, sm, sk, k0, m0, C, n0, ep, xsum, first, last)


@njit(cache=True)
def decode_tile(words, nib, kpl, tab, q_hi, q_lo, h, t, kb0, kb1, buf):
    """Decode rows ``16 t .. 16 t + 15``, blocks ``[kb0, kb1)`` into ``buf``
    (``16 * 8 * (kb1 - kb0)`` float32, coordinate-major: ``buf[16 c + r]``
    is row ``16 t + r`` at coordinate ``8 kb0 + c``)."""
    for gg in range(2):
        g = 2 * t + gg
        e = min(kb1, h)
        if kb0 < e:
            _decode_part(words, nib, kpl, tab[0], q_hi, g, kb0, e, buf, 8 * gg, kb0)
        s = max(kb0, h)
        if s < kb1:
            _decode_part(words, nib, kpl, tab[1], q_lo, g, s, kb1, buf, 8 * gg, kb0)


@njit(cache=True, parallel=True)
def gemm(words, nib, kpl, tab, q_hi, q_lo, h, x, C, ep, xsum, nthreads):
    """``C[m, i] = ep[0, i] <x_m, raw_i> + ep[1, i] xsum[m] + ep[2, i]`` for
    all rows ``x_m`` of the rotated activations ``x`` (M, at least 8 Bc) and
    all stored rows ``i`` (``C`` (M, 8 G), ``G`` even; it need not be
    initialised). ``ep`` (3, 8 G): per row of the weight its scale, mean and
    bias (the epilogue, applied as the last K tile stores).

    The tiles of 16 rows are split evenly between ``nthreads`` tasks. Each
    task walks cache blocks of ``MC`` activation rows, then K tiles of
    ``KC_BLOCKS`` blocks (the activations of one such block fit in L2; up to
    ``KC_WHOLE`` blocks, the whole K range is one tile), then its own
    tiles: a tile is decoded once into a buffer of at most 24 KiB (L1) and
    multiplied into every activation row of the cache block by register
    tiles of ``MR x 16`` accumulators.
    """
    G = words.shape[0]
    Bc = words.shape[1]
    M = C.shape[0]
    sm, sk = x.shape[1], 1
    T = G // 2
    nw = max(1, min(T, nthreads))
    kc = Bc if 0 < Bc <= KC_WHOLE else KC_BLOCKS
    for w in prange(nw):
        t0 = w * T // nw
        t1 = (w + 1) * T // nw
        buf = np.empty(16 * 8 * kc, np.float32)
        for mb in range(0, M, MC):
            me = min(M, mb + MC)
            for kb0 in range(0, Bc, kc):
                kb1 = min(Bc, kb0 + kc)
                for t in range(t0, t1):
                    decode_tile(words, nib, kpl, tab, q_hi, q_lo, h, t, kb0, kb1,
                                buf)
                    m0 = mb
                    while m0 < me:
                        mr = min(MR, me - m0)
                        _tile(mr, buf, 8 * (kb1 - kb0), x, sm, sk, 8 * kb0, m0, C,
                              16 * t, ep, xsum, kb0 == 0, kb1 == Bc)
                        m0 += mr


#: rows rotated together, one per SIMD lane (:func:`_rotate_panel`)
PANEL = 8


def array_pointers(context, builder, signature, args):
    """The data pointer of each array argument of an intrinsic (the
    argument itself for the others)."""
    return [array_data(context, builder, ty, val) if isinstance(ty, types.Array)
            else val for ty, val in zip(signature.args, args)]


def c_array(ty, dtype) -> bool:
    """Whether the numba type ``ty`` is a C-contiguous array of ``dtype``
    (what an intrinsic indexes through its data pointer)."""
    return isinstance(ty, types.Array) and ty.layout == "C" and ty.dtype == dtype


def _transposed8(b, v):
    """The columns of the 8 x 8 block whose rows are the 8-lane vectors
    ``v``: three stages of two-vector shuffles (interleave pairs, then pairs
    of pairs, then the halves); the values move, none is computed."""
    def shuf(x, y, idx):
        return b.shuffle_vector(x, y, ir.Constant(_V8I, idx))

    lo, hi = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    t = []
    for r in range(0, 8, 2):
        t += [shuf(v[r], v[r + 1], lo), shuf(v[r], v[r + 1], hi)]
    # t[2k], t[2k+1]: rows 2k, 2k+1 interleaved (columns 0,1,4,5 / 2,3,6,7)
    even, odd = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    u = []
    for h in (0, 4):
        for k in (0, 1):
            u += [shuf(t[h + k], t[h + k + 2], even),
                  shuf(t[h + k], t[h + k + 2], odd)]
    # u[0..3] (rows 0-3) and u[4..7] (rows 4-7): columns (0, 4), (1, 5),
    # (2, 6), (3, 7) in their two halves
    first, second = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    cols = [None] * 8
    for k, c in enumerate((0, 1, 2, 3)):
        cols[c] = shuf(u[k], u[k + 4], first)
        cols[c + 4] = shuf(u[k], u[k + 4], second)
    return cols


@intrinsic
def _transpose8(typingctx, src, s_off, s_ld, dst, d_off, d_ld):
    """The 8 x 8 block of the float32 array ``src`` whose row ``r`` is
    ``src.flat[s_off + r s_ld : + 8]``, transposed into ``dst``: row ``c``
    of the result goes to ``dst.flat[d_off + c d_ld : + 8]``. Three stages
    of two-vector shuffles (:func:`_transposed8`); the values move, none is
    computed."""
    if not (c_array(src, types.float32) and c_array(dst, types.float32)):
        return None                 # a typing error: contiguous float32 only
    sig = types.void(src, types.int64, types.int64, dst, types.int64,
                     types.int64)

    def codegen(context, builder, signature, args):
        ps, s_off, s_ld, pd, d_off, d_ld = array_pointers(context, builder,
                                                      signature, args)
        e = Emit(builder)
        b = builder
        v = [e.load_vec(ps, b.add(s_off, b.mul(s_ld, ir.Constant(_I64, r))),
                        _V8F) for r in range(8)]
        cols = _transposed8(b, v)
        for c in range(8):
            e.store_vec(cols[c], pd, b.add(d_off, b.mul(d_ld, ir.Constant(_I64, c))))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _center_signs8(typingctx, T, means, signs, n):
    """``T.flat[8 k : 8 k + 8] = (T.flat[8 k : 8 k + 8] - means) * signs[k]``
    for ``k < n`` (8 lanes: one row each; ``signs`` int8, ``means`` 8
    float32): the float32 operations of ``(x - mean) * sign``, lane by
    lane."""
    if not (c_array(T, types.float32) and c_array(means, types.float32)
            and c_array(signs, types.int8)):
        return None                 # a typing error
    sig = types.void(T, means, signs, types.int64)

    def codegen(context, builder, signature, args):
        pt, pm, psg, n = array_pointers(context, builder, signature, args)
        e = Emit(builder)
        b = builder
        mv = e.load_vec(pm, ir.Constant(_I64, 0), _V8F)
        with cgutils.for_range_slice(b, ir.Constant(_I64, 0), n,
                                     ir.Constant(_I64, 1), inc=True) as (k, _):
            at = b.mul(k, ir.Constant(_I64, 8))
            sk = b.sitofp(b.load(b.gep(psg, [k])), _F32)
            v = b.fmul(b.fsub(e.load_vec(pt, at, _V8F), mv), e.splat(sk, _V8F))
            e.store_vec(v, pt, at)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _mix8(typingctx, T, T2, orth, p):
    """``O_m`` on every group of 8-lane vectors: ``T2.flat[8 (i m + a) :
    + 8] = sum_c orth[a, c] T.flat[8 (i m + c) : + 8]`` for ``i < p``, ``a
    < m`` (``orth`` (m, m) float32), the sum from 0 in increasing ``c``,
    products and sums rounded apart (no fused multiply-add)."""
    if not (c_array(T, types.float32) and c_array(T2, types.float32)
            and c_array(orth, types.float32) and orth.ndim == 2):
        return None                 # a typing error
    sig = types.void(T, T2, orth, types.int64)

    def codegen(context, builder, signature, args):
        pt, pt2, po, p = array_pointers(context, builder, signature, args)
        e = Emit(builder)
        b = builder
        m = _shape(context, b, signature.args[2], args[2], 0)
        zero = ir.Constant(_I64, 0)
        one = ir.Constant(_I64, 1)
        acc = cgutils.alloca_once_value(b, e.vf(0.0))
        with cgutils.for_range_slice(b, zero, p, one, inc=True) as (i, _):
            base = b.mul(i, m)
            with cgutils.for_range_slice(b, zero, m, one, inc=True) as (a, _):
                b.store(e.vf(0.0), acc)
                row = b.mul(a, m)
                with cgutils.for_range_slice(b, zero, m, one, inc=True) as (c, _):
                    o = e.splat(b.load(b.gep(po, [b.add(row, c)])), _V8F)
                    v = e.load_vec(pt, b.mul(b.add(base, c), ir.Constant(_I64, 8)),
                                   _V8F)
                    b.store(b.fadd(b.load(acc), b.fmul(o, v)), acc)
                e.store_vec(b.load(acc), pt2,
                            b.mul(b.add(base, a), ir.Constant(_I64, 8)))
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _rotate_panel(x, r0, signs, orth, p, center, out, xsum, scale, T, T2,
                  means):
    """Rows ``r0 .. r0 + PANEL - 1`` of :func:`rotate_rows`, with rotation,
    one row per SIMD lane: the rows are transposed into ``T`` (coordinate
    ``k`` of row ``r0 + l`` at ``PANEL k + l``), where both factors of the
    rotation act on whole vectors of lanes -- ``O_m`` on the ``m``
    coordinates of a group, ``H_p`` on runs of ``m`` coordinates -- and
    transposed back. Per coordinate the same float32 operations, in the
    same order, as the per-row paths: ``(x - mean) sign``, ``sum_c O[a, c]
    y_c`` from 0 in increasing ``c``, the butterflies in increasing span,
    the scale last. ``T``, ``T2``: scratch of ``PANEL n_pad`` floats;
    ``means``: of ``PANEL``."""
    n = x.shape[1]
    n_pad = out.shape[1]
    m = orth.shape[0]
    for lane in range(PANEL):
        s = _row_sum(x, r0 + lane)
        xsum[r0 + lane] = s
        means[lane] = s / np.float32(n) if center else np.float32(0.0)
    nb = n // 8
    for kb in range(nb):
        _transpose8(x, r0 * n + 8 * kb, n, T, PANEL * 8 * kb, PANEL)
    for k in range(8 * nb, n):
        for lane in range(PANEL):
            T[PANEL * k + lane] = x[r0 + lane, k]
    _center_signs8(T, means, signs, n)
    for k in range(PANEL * n, PANEL * n_pad):
        T[k] = np.float32(0.0)
    Y = T
    if m > 1:
        _mix8(T, T2, orth, p)
        Y = T2
    # H_p: coordinates i m + c and (i + h) m + c meet, runs of h m vectors
    _stages_from(Y, 0, PANEL * m, PANEL * n_pad, scale, True)
    for kb in range(n_pad // 8):
        _transpose8(Y, PANEL * 8 * kb, PANEL, out, r0 * n_pad + 8 * kb, n_pad)


@njit(cache=True)
def _rotate_row(x, r, signs, orth, p, center, out, xsum, scale):
    """Row ``r`` of :func:`rotate_rows` alone."""
    n = x.shape[1]
    n_pad = out.shape[1]
    m = orth.shape[0]
    s = _row_sum(x, r)
    xsum[r] = s
    mean = s / np.float32(n) if center else np.float32(0.0)
    y = out[r]
    if signs.shape[0] == 0:
        for i in range(n):
            y[i] = x[r, i] - mean
        for i in range(n, n_pad):
            y[i] = np.float32(0.0)
        return
    if m == 1 or (m == 3 and p >= 8):
        for i in range(n):
            y[i] = (x[r, i] - mean) * np.float32(signs[i])
        for i in range(n, n_pad):
            y[i] = np.float32(0.0)
        # the stages of spans 1, 2, 4 in registers (with O_3 first when
        # m = 3), then the longer ones two per pass, the scale applied
        # as the last pass stores
        if m == 1:
            _hadamard8(y, 0, p)
            _stages_from(y, 0, 8, n_pad, scale, True)
        else:
            full = n_pad - n_pad % MIX3_STEP
            _mix3_hadamard8_x8(y, orth, 0, full)
            _mix3_hadamard8(y, orth, full, n_pad - full)
            _stages_from(y, 0, 24, n_pad, scale, True)
        return
    # (p, m) -> (m, p), the signs applied on the way
    a = np.zeros((m, p), np.float32)
    for i in range(p):
        for c in range(m):
            j = i * m + c
            if j < n:
                a[c, i] = (x[r, j] - mean) * np.float32(signs[j])
    b = np.zeros((m, p), np.float32)
    for row in range(m):
        for c in range(m):          # the sum over c in increasing order
            o = orth[row, c]
            for i in range(p):
                b[row, i] += o * a[c, i]
    bf = b.reshape(m * p)
    for row in range(m):
        _hadamard_run(bf, row * p, p)
    for i in range(p):
        for c in range(m):
            y[i * m + c] = b[c, i] * scale


@njit(cache=True, parallel=True)
def rotate_rows(x, signs, orth, p, center, out, xsum):
    """The activations in the coded domain: for each row ``x_m`` (length
    ``n``), ``xsum[m] = sum(x_m)`` and ``out[m] = P [x_m - mean(x_m); 0]``
    (``center``) or ``P [x_m; 0]``, with ``P = (H_p / sqrt(p)) (x) O_m
    diag(signs)`` (``orth`` the (m, m) factor ``O_m``; ``signs`` empty: no
    rotation, ``P = I``). float32 arithmetic; ``x`` C-contiguous, ``out``
    (M, n_pad) C-contiguous.

    Coordinate ``i m + c`` of a row is entry ``(i, c)`` of a (p, m) matrix;
    ``O_m`` mixes within its rows, ``H_p`` along its columns. Row by row
    (:func:`_rotate_row`): for ``m = 1`` the Hadamard stages run in place
    (spans 1, 2, 4 in registers, the others on runs of 8 lanes); for ``m =
    3`` (384, 1536, ...) ``O_3`` and the first three stages run in
    registers on windows of 24 floats, eight windows at a time, one per
    SIMD lane (:func:`_mix3_hadamard8_x8`; rows shorter than
    :data:`MIX3_STEP`: one window at a time, :func:`_mix3_hadamard8`), and
    the others on runs of 24, 48, ... floats, two stages per pass over the row
    (:func:`_stages_from`); for other ``m`` (576 = 64 x 9, 896 = 128 x 7,
    ...) the row is transposed to (m, p), so that both factors act on
    contiguous runs, and back -- except that these rows go ``PANEL`` at a
    time, one per SIMD lane (:func:`_rotate_panel`), where ``O_m`` is a
    product of whole vectors (about 3 times as fast at m = 9, twice at m =
    7). Every path gives the same bits.
    """
    M = x.shape[0]
    m = orth.shape[0]
    scale = np.float32(1.0 / np.sqrt(p))
    # the panels serve the odd factors without a path of their own (for m =
    # 1 and 3 the row paths were measured faster: fewer passes over memory)
    G = M // PANEL if signs.shape[0] > 0 and m != 1 and m != 3 else 0
    tasks = G + M - PANEL * G
    if serial(tasks):
        for t in range(tasks):
            _rotate_task(x, t, G, signs, orth, p, center, out, xsum, scale)
    else:
        for t in prange(tasks):
            _rotate_task(x, t, G, signs, orth, p, center, out, xsum, scale)


@njit(cache=True)
def _rotate_task(x, t, G, signs, orth, p, center, out, xsum, scale):
    """Task ``t`` of :func:`rotate_rows`: panel ``t`` (``t < G``), else
    one of the rows after the ``G`` panels."""
    if t < G:
        n_pad = out.shape[1]
        T = np.empty(PANEL * n_pad, np.float32)
        T2 = np.empty(PANEL * n_pad, np.float32)
        means = np.empty(PANEL, np.float32)
        _rotate_panel(x, PANEL * t, signs, orth, p, center, out, xsum,
                      scale, T, T2, means)
    else:
        _rotate_row(x, PANEL * G + t - G, signs, orth, p, center, out, xsum,
                    scale)


@njit(cache=True)
def _products(x_rot, xsum, words, nib, kpl, tab, q_hi, q_lo, h, alpha, n_pad,
             norms, means, bias, gemv_rows, nthreads, out):
    """``out[m, i] = s_i <x_rot_m, raw_i> + mu_i xsum[m] + b_i`` (M, a) for
    rotated activations ``x_rot`` (M, at least 8 Bc), with ``s_i = alpha
    norms_i / sqrt(n_pad)`` (``alpha`` when ``norms`` is empty), ``mu``
    the means (empty: 0) and ``b`` the bias (empty: 0). Up to ``gemv_rows``
    rows run the batch-1 kernel row by row, more rows the batched kernel,
    which applies the epilogue as it stores. One call from Python (exported
    as :func:`products`)."""
    M = x_rot.shape[0]
    a = out.shape[1]
    rows = 8 * words.shape[0]
    coded = words.shape[1]
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
    if coded == 0:
        for r in range(M):
            for i in range(a):
                out[r, i] = ep[1, i] * xsum[r] + ep[2, i]
        return
    if M > gemv_rows:
        C = out if a == rows else np.empty((M, rows), np.float32)
        gemm(words, nib, kpl, tab, q_hi, q_lo, h, x_rot, C, ep, xsum, nthreads)
        if a != rows:
            for r in range(M):
                for i in range(a):
                    out[r, i] = C[r, i]
        return
    acc = np.empty((GEMV_MAX_ROWS, rows), np.float32)
    for r0 in range(0, M, GEMV_MAX_ROWS):
        R = min(GEMV_MAX_ROWS, M - r0)
        xs = np.empty((R, coded, 8), np.float32)
        xr = np.empty((R, coded, 8), np.float32)
        xc = np.empty((R, coded, 2), np.float32)
        gemv_activations(x_rot[r0:r0 + R], coded, xs, xr, xc)
        gemv(words, nib, kpl, tab, q_hi, q_lo, h, xs, xr, xc, acc[:R])
        for r in range(R):
            for i in range(a):
                out[r0 + r, i] = (ep[0, i] * acc[r, i] + ep[1, i] * xsum[r0 + r]
                                  + ep[2, i])


@njit(cache=True)
def linear(x, n_pad, signs, orth, p, center, words, nib, kpl, tab, q_hi, q_lo,
           h, alpha, norms, means, bias, gemv_rows, nthreads, out, x_rot, xsum):
    """``x @ W_hat.T + bias``: :func:`rotate_rows` then :func:`products`,
    in one call; ``x_rot`` (at least (M, n_pad)) and ``xsum`` (at least
    (M,)) float32 are its scratch (the caller's: they may be reused from
    call to call)."""
    M = x.shape[0]
    x_rot = x_rot[:M]
    xsum = xsum[:M]
    rotate_rows(x, signs, orth, p, center, x_rot, xsum)
    _products(x_rot, xsum, words, nib, kpl, tab, q_hi, q_lo, h, alpha, n_pad,
             norms, means, bias, gemv_rows, nthreads, out)


@njit(cache=True, parallel=True)
def layout_fields(codes, index, q, words, nib, kp):
    """The CPU-layout fields of blocks with codes ``codes`` (m, 8) and scale
    indices ``index`` (m,) of one part (nesting ratio ``q <= 16``).

    Each block is decoded by numba's decoder (:func:`decode_e8_into`, scale
    1, no dither: the output is exactly ``r / 2``). The parity fix leaves
    every coordinate in ``[-q, q)`` but the one it moved, which lies outside
    (in ``[-2q, -q)`` or ``[q, 2q)``); moving it back gives ``r_pre``, and
    ``r_pre + q = 2 m + pi``, ``u = m - T + 8``. Writes the packed word
    (int32), the nibble ``index | pi << 3`` and ``7 - k`` per block; returns
    the number of blocks whose fields break a rule the kernels rely on
    (``u`` in [0, 16), at most one moved coordinate, the parity of ``sum u``:
    ``odd`` for odd ``q``, even for even ``q``) -- 0 unless the decoder
    changed."""
    m = codes.shape[0]
    nchunks = (m + CHUNK - 1) // CHUNK
    bad = np.zeros(nchunks, np.int64)
    z = np.zeros(8)
    for c in prange(nchunks):
        y = np.empty(8)
        w = np.empty(8)
        tmp = np.empty(8)
        out = np.empty(8)
        crow = np.empty(8, dtype=np.int64)
        r = np.empty(8, dtype=np.int64)
        for i in range(c * CHUNK, min(m, (c + 1) * CHUNK)):
            for j in range(8):
                crow[j] = codes[i, j]
            decode_e8_into(crow, q, 1.0, z, out, y, w, tmp)
            k = 0
            moved = 0
            for j in range(8):
                r[j] = np.int64(2.0 * out[j])
                if r[j] < -q or r[j] >= q:
                    k = j
                    moved += 1
            odd = 1 if moved > 0 else 0
            if odd:
                r[k] += 2 * q if r[k] < 0 else -2 * q
            pi = (r[0] + q) & 1
            T = q // 2 if q % 2 == 0 else (q + 1) // 2 - pi
            word = np.int64(0)
            usum = 0
            ok = moved <= 1
            u7 = 0
            for j in range(8):
                mj = (r[j] + q - pi) // 2
                u = mj - T + 8
                ok = ok and 0 <= u < 16 and (r[j] + q - pi) % 2 == 0
                usum += u
                if j < 7:
                    word |= u << (4 * j)
                else:
                    u7 = u
            if q % 2:
                ok = ok and (usum & 1) == odd
                word |= u7 << 28
            else:
                ok = ok and (usum & 1) == 0
                word |= (odd | ((u7 >> 1) << 1)) << 28
            if not ok:
                bad[c] += 1
            words[i] = np.int32(word - (1 << 32) if word >= (1 << 31) else word)
            nib[i] = index[i] | (pi << 3)
            kp[i] = 7 - k
    return bad.sum()


products = _products

# serialised when numba's threading layer is not thread-safe; the two
# drivers run parallel kernels inside, so they are serialised too
guard_module(globals())
if not threadsafe():
    products = guarded(_products)
    linear = guarded(linear)
