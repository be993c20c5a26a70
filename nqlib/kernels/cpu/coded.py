"""Numba kernels of the coded domain: the rows the lattice codes, the
fixed-mode code of a whole matrix of them, the projection of decoded rows,
the sums of the MMSE shrinkage, and the float32 rows the fused CPU product
takes.

They compute, in one compiled pass per row, the same float64 values as the
numpy pipeline of :mod:`nqlib.quantizers.coded_domain` (which holds the
reference arithmetic): the same operations on the same operands in the same
order, with no ``fastmath`` (so LLVM neither reassociates nor fuses
multiply-adds). Sums that numpy forms follow numpy's pairwise order
(:func:`pairwise_sum`). Every intermediate array of the numpy pipeline
(copies, transposes, products) is a fresh allocation; here each row is
transformed in place, which is what makes activations quantized on every
call cheap.

Arrays in, arrays out.
Book: chapter "The practical quantizer", label ``ch-practical``.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from nqlib.kernels.cpu.fused import (
    MIX3_STEP,
    V8D,
    Emit,
    array_pointers,
    c_array,
    mix3_butterflies_f64,
)
from nqlib.kernels.cpu.guard import guard_module, guarded, serial, threadsafe
from nqlib.kernels.cpu.hadamard import butterflies, fwht_row
from nqlib.kernels.cpu.lattice import CHUNK
from nqlib.kernels.cpu.nested import encode_pack_serial

#: numpy's block length of pairwise summation (``PW_BLOCKSIZE``)
PAIRWISE_BLOCK = 128


def _lane_sums_intrinsic(mode):
    """The intrinsic ``_lane_sums<mode>(a, b, start, count)``: the eight
    accumulators of numpy's pairwise leaf over ``count`` (a multiple of 8,
    at least 8) values from flat index ``start`` of the C-contiguous
    float64 vectors ``a`` and ``b`` -- accumulator ``k`` starts at value
    ``start + k`` and adds values ``start + k + 8, start + k + 16, ...`` in
    that order -- as a tuple of eight floats, on one 8-lane vector. The
    values are ``a[i]`` (``mode`` 0), ``a[i] * b[i]`` (1) or ``a[i] *
    a[i]`` (2), each product rounded before it is added."""
    def _lane_sums(typingctx, a, b, start, count):
        if not all(c_array(t, types.float64) and t.ndim == 1 for t in (a, b)):
            return None             # a typing error
        sig = types.UniTuple(types.float64, 8)(a, b, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            bld = builder
            e = Emit(bld)
            pa, pb, start, count = array_pointers(context, bld, signature, args)
            pa = bld.gep(pa, [start])
            pb = bld.gep(pb, [start])

            def value(at):
                va = e.load_vec(pa, at, V8D)
                if mode == 0:
                    return va
                if mode == 1:
                    return bld.fmul(va, e.load_vec(pb, at, V8D))
                return bld.fmul(va, va)

            acc = cgutils.alloca_once_value(bld, value(ir.Constant(_I64, 0)))
            nvec = bld.sdiv(count, ir.Constant(_I64, 8))
            with cgutils.for_range_slice(bld, ir.Constant(_I64, 1), nvec,
                                         ir.Constant(_I64, 1), inc=True) as (i, _):
                at = bld.mul(i, ir.Constant(_I64, 8))
                bld.store(bld.fadd(bld.load(acc), value(at)), acc)
            v = bld.load(acc)
            lanes = [bld.extract_element(v, ir.Constant(ir.IntType(32), k))
                     for k in range(8)]
            return context.make_tuple(bld, signature.return_type, lanes)

        return sig, codegen

    return intrinsic(_lane_sums)


_lane_sums0, _lane_sums1, _lane_sums2 = (_lane_sums_intrinsic(m) for m in range(3))


@njit(cache=True)
def _pairwise_leaf(a, b, start, n, mode):
    """numpy's pairwise sum of a run of at most ``PAIRWISE_BLOCK`` values:
    eight accumulators over the multiple of 8 (on one SIMD vector,
    :func:`_lane_sums_intrinsic`), added as a balanced tree, then the rest
    one by one. The values are ``a[i]`` (``mode`` 0), ``a[i] * b[i]`` (1)
    or ``a[i] * a[i]`` (2), each product rounded as numpy rounds the
    product array before summing it."""
    if n < 8:
        res = -0.0
        for i in range(start, start + n):
            res += _value(a, b, i, mode)
        return res
    n8 = n - n % 8
    if mode == 0:
        r = _lane_sums0(a, b, start, n8)
    elif mode == 1:
        r = _lane_sums1(a, b, start, n8)
    else:
        r = _lane_sums2(a, b, start, n8)
    res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    for i in range(start + n8, start + n):
        res += _value(a, b, i, mode)
    return res


@njit(cache=True, inline="always")
def _value(a, b, i, mode):
    if mode == 0:
        return a[i]
    if mode == 1:
        return a[i] * b[i]
    return a[i] * a[i]


@njit(cache=True)
def pairwise_sum(a, b, start, n, mode):
    """``np.sum`` of the ``n`` values from flat index ``start`` of the 1-D
    float64 arrays ``a`` (and ``b``) -- ``a`` (``mode`` 0), ``a * b`` (1)
    or ``a * a`` (2) --, the bits numpy gives: its reduction adds the
    pairwise sum to the identity 0.0, and the pairwise sum splits a run of
    more than ``PAIRWISE_BLOCK`` values at half its length rounded down to
    a multiple of 8 (:func:`_pairwise_leaf` for the runs left). The tree is
    walked with an explicit stack (its depth is below 64 for any length)."""
    if n <= PAIRWISE_BLOCK:
        return 0.0 + _pairwise_leaf(a, b, start, n, mode)
    s_start = np.empty(64, np.int64)
    s_len = np.empty(64, np.int64)
    s_state = np.empty(64, np.int64)
    vals = np.empty(64)
    sp = 0
    vp = 0
    s_start[0] = start
    s_len[0] = n
    s_state[0] = 0
    while sp >= 0:
        st = s_start[sp]
        ln = s_len[sp]
        if ln <= PAIRWISE_BLOCK:
            vals[vp] = _pairwise_leaf(a, b, st, ln, mode)
            vp += 1
            sp -= 1
            continue
        half = ln // 2
        half -= half % 8
        state = s_state[sp]
        if state == 0:              # the left half first
            s_state[sp] = 1
            sp += 1
            s_start[sp] = st
            s_len[sp] = half
            s_state[sp] = 0
        elif state == 1:            # then the right half
            s_state[sp] = 2
            sp += 1
            s_start[sp] = st + half
            s_len[sp] = ln - half
            s_state[sp] = 0
        else:                       # both done: left + right
            vals[vp - 2] = vals[vp - 2] + vals[vp - 1]
            vp -= 1
            sp -= 1
    return 0.0 + vals[0]


@njit(cache=True, parallel=True)
def coded_rows_into(X, center, normalize, signs, orth_t, p, Y, means, norms):
    """The rows the lattice codes, one compiled pass per row.

    For each row ``x`` of ``X`` (a, n) (float32 or float64; taken as
    float64), as :func:`nqlib.quantizers.coded_domain.coded_rows` computes
    it: with ``center``, ``mu = float32(sum(x) / n)`` (``means[i]``) is
    subtracted; with ``normalize``, ``norms[i] = float32(sqrt(sum(x^2)))``
    and the row is scaled by ``sqrt(n_pad) / norms[i]`` (0 for a zero
    norm); the row is zero-padded to ``n_pad`` (the width of ``Y`` (a,
    n_pad)) and, when ``signs`` (n_pad,) is not empty, rotated by
    ``P = (H_p / sqrt(p)) (x) O diag(signs)``:

    * the signs multiply the row;
    * with ``m = n_pad / p > 1``, each run of ``m`` coordinates is
      multiplied by ``orth_t`` (``O^T``, (m, m)), each output summed over
      the run in increasing order from 0.0 (as
      :func:`nqlib.kernels.cpu.linalg.rows_times_matrix`);
    * with ``p > 1``, each of the ``m`` interleaved sequences of ``p``
      coordinates gets the Walsh--Hadamard transform scaled by
      ``1 / sqrt(p)`` (the butterflies of
      :func:`nqlib.kernels.cpu.hadamard.fwht_row`, on all ``m`` sequences
      at once when ``m > 1``).

    Every path has these bits: for ``m = 3`` the mixing and the spans 1, 2
    and 4 run on eight windows of 24 values at a time, one per SIMD lane
    (:func:`nqlib.kernels.cpu.fused.mix3_butterflies_f64`, rows of a
    multiple of 192); for ``m > 3`` on the transposed (m, p) matrix
    (:func:`_mix_hadamard_columns`).

    Sums follow numpy's pairwise order (:func:`pairwise_sum`). ``means``
    and ``norms`` (a,) float32 are written when their step is on.
    """
    a = X.shape[0]
    if serial(a):
        for i in range(a):
            _coded_row(X, i, center, normalize, signs, orth_t, p, Y, means,
                       norms)
    else:
        for i in prange(a):
            _coded_row(X, i, center, normalize, signs, orth_t, p, Y, means,
                       norms)


@njit(cache=True)
def _coded_row(X, i, center, normalize, signs, orth_t, p, Y, means, norms):
    """Row ``i`` of :func:`coded_rows_into`."""
    n = X.shape[1]
    n_pad = Y.shape[1]
    rotate = signs.shape[0] > 0
    m = n_pad // p
    scale = 1.0 / np.sqrt(np.float64(p))
    root = np.sqrt(np.float64(n_pad))
    y = Y[i]
    for j in range(n):
        y[j] = np.float64(X[i, j])
    if center:
        mu = np.float32(pairwise_sum(y, y, 0, n, 0) / n)
        means[i] = mu
        mu64 = np.float64(mu)
        for j in range(n):
            y[j] -= mu64
    if normalize:
        nrm = np.float32(np.sqrt(pairwise_sum(y, y, 0, n, 2)))
        norms[i] = nrm
        s = np.float64(nrm)
        f = root / s if s > 0 else 0.0
        for j in range(n):
            y[j] *= f
    for j in range(n, n_pad):
        y[j] = 0.0
    if not rotate:
        return
    for j in range(n_pad):
        y[j] *= signs[j]
    h = 1                       # the first Hadamard span left to do
    if m == 3 and n_pad % MIX3_STEP == 0:
        # O^T and the spans 1, 2, 4 on eight windows of 24 values at a time
        mix3_butterflies_f64(y, orth_t, n_pad)
        h = 8
    elif m == 3:                # (lengths 3 * 2^k) the same sums, unrolled
        o00, o01, o02 = orth_t[0, 0], orth_t[0, 1], orth_t[0, 2]
        o10, o11, o12 = orth_t[1, 0], orth_t[1, 1], orth_t[1, 2]
        o20, o21, o22 = orth_t[2, 0], orth_t[2, 1], orth_t[2, 2]
        for k in range(p):
            o = 3 * k
            r0, r1, r2 = y[o], y[o + 1], y[o + 2]
            y[o] = ((0.0 + r0 * o00) + r1 * o10) + r2 * o20
            y[o + 1] = ((0.0 + r0 * o01) + r1 * o11) + r2 * o21
            y[o + 2] = ((0.0 + r0 * o02) + r1 * o12) + r2 * o22
    elif m > 1 and p % 8 == 0:
        _mix_hadamard_columns(y, orth_t, p, m, scale)
        return
    elif m > 1:                 # (p < 8: the scalar methods' lengths)
        run = np.empty(m)
        for k in range(p):
            o = k * m
            for c in range(m):
                run[c] = y[o + c]
            for c in range(m):
                acc = 0.0
                for t in range(m):
                    acc += run[t] * orth_t[t, c]
                y[o + c] = acc
    if p > 1:
        if m == 1:
            fwht_row(y, scale)
        else:
            # the m interleaved sequences at once: a butterfly of span
            # h pairs the runs of h m coordinates starting at groups
            # s and s + h (the same additions, stage after stage, as
            # fwht_row on each sequence alone)
            while h < p:
                for s in range(0, p, 2 * h):
                    butterflies(y, s * m, (s + h) * m, h * m)
                h *= 2
            for j in range(n_pad):
                y[j] *= scale


_I64 = ir.IntType(64)
#: outputs of :func:`_columns_times` formed together (each load of ``Z``
#: serves them all)
COLUMN_GROUP = 8


@intrinsic
def _columns_times(typingctx, Z, O, W):
    """``W[c, k] = sum_t Z[t, k] O[t, c]`` for ``Z`` (m, p), ``O`` (m, m),
    ``W`` (m, p) (C-contiguous float64, ``p`` a multiple of 8): each sum
    from 0.0 in increasing ``t``, products and sums rounded apart (no fused
    multiply-add) -- the order of the scalar loop ``w = 0.0; w += z * o``.
    Eight ``k`` per vector, :data:`COLUMN_GROUP` outputs ``c`` at a time in
    registers (one load of ``Z`` for all of them)."""
    if not all(c_array(t, types.float64) and t.ndim == 2 for t in (Z, O, W)):
        return None                 # a typing error
    sig = types.void(Z, O, W)

    def codegen(context, builder, signature, args):
        b = builder
        e = Emit(b)
        pz, po, pw = array_pointers(context, b, signature, args)
        shape = cgutils.unpack_tuple(
            b, context.make_array(signature.args[0])(context, b, args[0]).shape)
        m, p = shape[0], shape[1]
        zero = ir.Constant(_I64, 0)
        one = ir.Constant(_I64, 1)
        vzero = ir.Constant(V8D, [0.0] * 8)

        def group(k0, c0, g):
            acc = [cgutils.alloca_once_value(b, vzero) for _ in range(g)]
            with cgutils.for_range_slice(b, zero, m, one, inc=True) as (t, _):
                z = e.load_vec(pz, b.add(b.mul(t, p), k0), V8D)
                row = b.mul(t, m)
                for j in range(g):
                    o = b.load(b.gep(po, [b.add(row, b.add(c0, ir.Constant(
                        _I64, j)))]))
                    b.store(b.fadd(b.load(acc[j]), b.fmul(z, e.splat(o, V8D))),
                            acc[j])
            for j in range(g):
                at = b.add(b.mul(b.add(c0, ir.Constant(_I64, j)), p), k0)
                e.store_vec(b.load(acc[j]), pw, at)

        nk = b.sdiv(p, ir.Constant(_I64, 8))
        ng = b.sdiv(m, ir.Constant(_I64, COLUMN_GROUP))
        with cgutils.for_range_slice(b, zero, nk, one, inc=True) as (kb, _):
            k0 = b.mul(kb, ir.Constant(_I64, 8))
            with cgutils.for_range_slice(b, zero, ng, one, inc=True) as (gi, _):
                group(k0, b.mul(gi, ir.Constant(_I64, COLUMN_GROUP)),
                      COLUMN_GROUP)
            rest = b.mul(ng, ir.Constant(_I64, COLUMN_GROUP))
            with cgutils.for_range_slice(b, rest, m, one, inc=True) as (c, _):
                group(k0, c, 1)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _mix_hadamard_columns(y, orth_t, p, m, scale):
    """In place on ``y`` (``p m`` coordinates, ``p`` a multiple of 8; entry
    ``(k, c)`` of a (p, m) matrix at ``k m + c``): each run of ``m`` times
    ``orth_t``, then the Walsh--Hadamard transform of each of the ``m``
    interleaved sequences scaled by ``scale`` -- the arithmetic of
    :func:`_coded_row`'s interleaved loops, on the transposed (m, p)
    matrix: output ``c`` of a run is ``sum_t y_t orth_t[t, c]`` from 0.0 in
    increasing ``t``, formed for all ``p`` runs side by side
    (:func:`_columns_times`), and each sequence is then a contiguous row
    for :func:`fwht_row` (the same butterflies, the same bits)."""
    Z = np.empty((m, p))
    for t in range(m):
        for k in range(p):
            Z[t, k] = y[k * m + t]
    W = np.empty((m, p))
    _columns_times(Z, orth_t, W)
    for c in range(m):
        fwht_row(W[c], scale)
        for k in range(p):
            y[k * m + c] = W[c, k]


@njit(cache=True, parallel=True)
def _project_rows(R, u, center):
    """``R -= outer(R u, u)`` in place (``R u`` summed in increasing index
    from 0.0, as :func:`nqlib.kernels.cpu.linalg.rows_dot`; each entry
    ``r - d u`` with the product rounded first); nothing without
    ``center``."""
    if not center:
        return
    groups = (R.shape[0] + 7) // 8
    if serial(groups):
        for g in range(groups):
            _project_group(R, g, u)
    else:
        for g in prange(groups):
            _project_group(R, g, u)


@njit(cache=True)
def _project_group(R, g, u):
    """Rows ``8 g .. 8 g + 7`` of :func:`_project_rows`: the eight sums
    ``R u`` side by side (eight independent chains of additions, each in
    increasing index from 0.0: a row's sum alone waits on the latency of
    every addition), then each row's update."""
    a, n = R.shape
    i0 = 8 * g
    if i0 + 8 > a:
        for i in range(i0, a):
            d = 0.0
            for j in range(n):
                d += R[i, j] * u[j]
            _project_update(R, i, d, u)
        return
    d0 = d1 = d2 = d3 = d4 = d5 = d6 = d7 = 0.0
    for j in range(n):
        uj = u[j]
        d0 += R[i0, j] * uj
        d1 += R[i0 + 1, j] * uj
        d2 += R[i0 + 2, j] * uj
        d3 += R[i0 + 3, j] * uj
        d4 += R[i0 + 4, j] * uj
        d5 += R[i0 + 5, j] * uj
        d6 += R[i0 + 6, j] * uj
        d7 += R[i0 + 7, j] * uj
    for k, d in enumerate((d0, d1, d2, d3, d4, d5, d6, d7)):
        _project_update(R, i0 + k, d, u)


@njit(cache=True, inline="always")
def _project_update(R, i, d, u):
    """``R[i] = R[i] - d u``, each product rounded first."""
    for j in range(R.shape[1]):
        R[i, j] = R[i, j] - d * u[j]


@njit(cache=True)
def project_mmse(R, Y, u, center):
    """The decoded rows ``R`` (a, n_pad) projected in place off the unit
    mean direction ``u`` (with ``center``; see
    :func:`nqlib.quantizers.coded_domain.project`, for matrices without
    padding), and the MMSE sums ``(sum(R * Y), sum(R * R))`` over the whole
    matrices in numpy's order (:func:`pairwise_sum` on the flat arrays)."""
    _project_rows(R, u, center)
    rf = R.reshape(R.size)
    yf = Y.reshape(Y.size)
    num = pairwise_sum(rf, yf, 0, rf.shape[0], 1)
    den = pairwise_sum(rf, rf, 0, rf.shape[0], 2)
    return num, den


@njit(cache=True, parallel=True)
def scaled_rows_float32(Y, scales, out):
    """``out = (Y * scales[:, None]).astype(float32)``: each product in
    float64, then rounded to float32, row-parallel."""
    a, n = Y.shape
    for i in prange(a):
        s = scales[i]
        for j in range(n):
            out[i, j] = np.float32(Y[i, j] * s)


#: blocks per task of :func:`encode_fixed_rows` (a multiple of 8, so that
#: every task's words start on a byte of its part; the encoder's own chunk,
#: so that a task is one chunk of it): its scratch, 216 bytes a block
#: (54 KiB), stays in the L2 cache
PART_CHUNK = CHUNK


@njit(cache=True, parallel=True)
def _encode_part(Y, R, b0, b1, q, betas, nbits, packed):
    """Blocks ``[b0, b1)`` of every row of ``Y`` (a, 8 B), in the order
    (row, block), coded by the ``nbits``-bit multiscale code into
    ``packed``, ``PART_CHUNK`` blocks per task, the tasks split over
    threads (:func:`~nqlib.kernels.cpu.nested.encode_pack_serial`); their
    decode into the same blocks of ``R``."""
    total = Y.shape[0] * (b1 - b0)
    tasks = (total + PART_CHUNK - 1) // PART_CHUNK
    if serial(tasks):
        for c in range(tasks):
            _encode_task(Y, R, b0, b1, q, betas, nbits, packed, c)
    else:
        for c in prange(tasks):
            _encode_task(Y, R, b0, b1, q, betas, nbits, packed, c)


@njit(cache=True)
def _encode_task(Y, R, b0, b1, q, betas, nbits, packed, c):
    """Task ``c`` of :func:`_encode_part`: its blocks gathered, coded,
    packed at their byte of ``packed``, decoded into ``R``."""
    width = b1 - b0
    c0 = c * PART_CHUNK
    c1 = min(Y.shape[0] * width, c0 + PART_CHUNK)
    m = c1 - c0
    # views of three allocations (a task of a batch-1 row has few blocks)
    f = np.empty(17 * m + 8)
    x = f[:8 * m].reshape(m, 8)
    dec = f[8 * m:16 * m].reshape(m, 8)
    sqerr = f[16 * m:17 * m]
    z = f[17 * m:].reshape(1, 8)
    z[:] = 0.0
    g = np.empty(9 * m, np.int64)
    codes = g[:8 * m].reshape(m, 8)
    index = g[8 * m:]
    words = np.empty(m, np.uint64)
    for t in range(c0, c1):
        i = t // width
        o = 8 * (b0 + t - i * width)
        for j in range(8):
            x[t - c0, j] = Y[i, o + j]
    encode_pack_serial(x, q, betas, z, nbits,
                       packed[c0 * nbits // 8:], dec, codes, index, sqerr, words)
    for t in range(c0, c1):
        i = t // width
        o = 8 * (b0 + t - i * width)
        for j in range(8):
            R[i, o + j] = dec[t - c0, j]


@njit(cache=True)
def encode_fixed_rows(Y, h, coded, q_hi, betas_hi, L_hi, packed_hi, q_lo,
                      betas_lo, L_lo, packed_lo, R):
    """The fixed-mode code of the coded rows ``Y`` (a, 8 B), without dither:
    blocks ``[0, h)`` of every row by the ``L_hi``-bit code (base ``q_hi``,
    scales ``betas_hi``), blocks ``[h, coded)`` by the ``L_lo``-bit code,
    the words of each part packed in the order (row, block) into the zeroed
    ``packed_hi`` / ``packed_lo``. ``R`` (a, 8 B) receives the decoded rows,
    0 on the blocks from ``coded`` on (dropped). The words and the decode of
    :func:`nqlib.quantizers.fixed_mode.encode` (which codes a chunk of rows
    at a time: every block is coded alone, so the words are the same)."""
    if h > 0:
        _encode_part(Y, R, 0, h, q_hi, betas_hi, L_hi, packed_hi)
    if coded > h:
        _encode_part(Y, R, h, coded, q_lo, betas_lo, L_lo, packed_lo)
    for i in range(Y.shape[0]):
        for c in range(8 * coded, Y.shape[1]):
            R[i, c] = 0.0


@njit(cache=True, parallel=True)
def _scaled_outputs(R, alpha, norms, normalize, rows32):
    """``R *= alpha`` and, when ``rows32`` has ``R``'s rows, ``rows32 =
    float32(R * s)`` with the row scales ``s = float64(norm) / sqrt(n_pad)``
    (1 without ``normalize``): the arithmetic of ``R *= alpha`` in numpy,
    of :meth:`~nqlib.quantizers.matrix.QuantizedMatrix.row_scales` and of
    :func:`scaled_rows_float32`."""
    a = R.shape[0]
    if serial(a):
        for i in range(a):
            _scaled_row(R, i, alpha, norms, normalize, rows32)
    else:
        for i in prange(a):
            _scaled_row(R, i, alpha, norms, normalize, rows32)


@njit(cache=True, inline="always")
def _scaled_row(R, i, alpha, norms, normalize, rows32):
    """Row ``i`` of :func:`_scaled_outputs`."""
    a, n = R.shape
    want32 = rows32.shape[0] == a
    s = np.float64(norms[i]) / np.sqrt(np.float64(n)) if normalize else 1.0
    for j in range(n):
        r = R[i, j] * alpha
        R[i, j] = r
        if want32:
            rows32[i, j] = np.float32(r * s)


@njit(cache=True)
def code_fixed_rows(X, bound, center, normalize, signs, orth_t, p, u, h, coded,
                    q_hi, betas_hi, L_hi, packed_hi, q_lo, betas_lo, L_lo,
                    packed_lo, max_alpha, Y, means, norms, R, rows32):
    """The whole fixed-mode code of the rows ``X`` (a, n) (no padding, no
    dither, MMSE estimator) in one compiled call: :func:`coded_rows_into`
    into ``Y``, ``means``, ``norms``; :func:`encode_fixed_rows` into the
    zeroed ``packed_hi`` / ``packed_lo`` and the decoded rows ``R``;
    :func:`project_mmse`; the shrinkage ``alpha`` (``float32(num / den)``
    when ``den > 0``, else 1; 1 when ``|alpha| > max_alpha``); ``R *=
    alpha``, and the float32 scaled rows into ``rows32`` when it has ``a``
    rows (:func:`_scaled_outputs`).

    Returns ``(True, alpha)``; ``(False, 1.0)`` with nothing written when
    some ``|x| * sqrt(n)`` is not below ``bound`` (NaN and inf included):
    the caller's general path then says why.
    """
    a, n = X.shape
    root = np.sqrt(np.float64(n))
    for i in range(a):
        for j in range(n):
            if not abs(np.float64(X[i, j])) * root < bound:
                return False, 1.0
    coded_rows_into(X, center, normalize, signs, orth_t, p, Y, means, norms)
    encode_fixed_rows(Y, h, coded, q_hi, betas_hi, L_hi, packed_hi, q_lo,
                      betas_lo, L_lo, packed_lo, R)
    num, den = project_mmse(R, Y, u, center)
    alpha = np.float64(np.float32(num / den)) if den > 0 else 1.0
    if not abs(alpha) <= max_alpha:
        alpha = 1.0
    _scaled_outputs(R, alpha, norms, normalize, rows32)
    return True, alpha


# serialised when numba's threading layer is not thread-safe; the driver
# runs parallel kernels inside, so it is serialised too
guard_module(globals())
if not threadsafe():
    encode_fixed_rows = guarded(encode_fixed_rows)
    project_mmse = guarded(project_mmse)
    code_fixed_rows = guarded(code_fixed_rows)
