"""Numba fast Walsh--Hadamard transform over rows.

The butterflies of the long spans run on vectors (:func:`butterflies`, LLVM
vector IR: numba does not vectorise ``a, b = a + b, a - b`` on two runs of
one array, which might overlap as far as it knows). Each output is the same
``+`` or ``-`` of the same two values as in the scalar loop, so the bits do
not change.
"""

from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from nqlib.kernels.cpu.guard import guard_module


@intrinsic
def butterflies(typingctx, arr, off_a, off_b, count):
    """``a, b = a + b, a - b`` elementwise on the runs ``arr.flat[off_a :
    off_a + count]`` and ``arr.flat[off_b : off_b + count]`` (disjoint) of a
    C-contiguous float32 or float64 array, 256 bits (8 or 4 lanes) at a
    time, the tail one by one."""
    if (not isinstance(arr, types.Array) or arr.layout != "C"
            or arr.dtype not in (types.float32, types.float64)):
        return None                 # a typing error: contiguous floats only
    sig = types.void(arr, types.int64, types.int64, types.int64)
    scalar = ir.FloatType() if arr.dtype == types.float32 else ir.DoubleType()
    lanes = 8 if arr.dtype == types.float32 else 4
    width = 4 if arr.dtype == types.float32 else 8        # element alignment
    vty = ir.VectorType(scalar, lanes)
    i64 = ir.IntType(64)

    def codegen(context, builder, signature, args):
        arr_v, off_a, off_b, count = args
        ptr = context.make_array(signature.args[0])(context, builder, arr_v).data
        pa = builder.gep(ptr, [off_a])
        pb = builder.gep(ptr, [off_b])
        nvec = builder.sdiv(count, ir.Constant(i64, lanes))
        zero = ir.Constant(i64, 0)
        one = ir.Constant(i64, 1)
        with cgutils.for_range_slice(builder, zero, nvec, one, inc=True) as (i, _):
            at = builder.mul(i, ir.Constant(i64, lanes))
            qa = builder.bitcast(builder.gep(pa, [at]), vty.as_pointer())
            qb = builder.bitcast(builder.gep(pb, [at]), vty.as_pointer())
            a = builder.load(qa, align=width)
            b = builder.load(qb, align=width)
            builder.store(builder.fadd(a, b), qa, align=width)
            builder.store(builder.fsub(a, b), qb, align=width)
        tail = builder.mul(nvec, ir.Constant(i64, lanes))
        with cgutils.for_range_slice(builder, tail, count, one, inc=True) as (i, _):
            qa = builder.gep(pa, [i])
            qb = builder.gep(pb, [i])
            a = builder.load(qa)
            b = builder.load(qb)
            builder.store(builder.fadd(a, b), qa)
            builder.store(builder.fsub(a, b), qb)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def fwht_row(r, scale):
    """In place, ``r = scale * H r`` (length ``n = 2^k``): the butterflies of
    spans 1, 2 and 4 on each run of 8 in registers, stage after stage within
    the run (the same butterflies on the same values as stage after stage
    over the whole row, hence the same bits), then the longer spans. A
    function of its own, not inlined into the parallel loop, so that LLVM
    vectorises its loops."""
    n = r.shape[0]
    h = 1
    if n >= 8:
        for s0 in range(0, n, 8):
            a0 = r[s0]
            a1 = r[s0 + 1]
            a2 = r[s0 + 2]
            a3 = r[s0 + 3]
            a4 = r[s0 + 4]
            a5 = r[s0 + 5]
            a6 = r[s0 + 6]
            a7 = r[s0 + 7]
            b0, b1, b2, b3 = a0 + a1, a0 - a1, a2 + a3, a2 - a3
            b4, b5, b6, b7 = a4 + a5, a4 - a5, a6 + a7, a6 - a7
            c0, c1, c2, c3 = b0 + b2, b1 + b3, b0 - b2, b1 - b3
            c4, c5, c6, c7 = b4 + b6, b5 + b7, b4 - b6, b5 - b7
            r[s0] = c0 + c4
            r[s0 + 1] = c1 + c5
            r[s0 + 2] = c2 + c6
            r[s0 + 3] = c3 + c7
            r[s0 + 4] = c0 - c4
            r[s0 + 5] = c1 - c5
            r[s0 + 6] = c2 - c6
            r[s0 + 7] = c3 - c7
        h = 8
    while h < n:
        for start in range(0, n, 2 * h):
            butterflies(r, start, start + h, h)
        h *= 2
    for j in range(n):
        r[j] *= scale


@njit(cache=True, parallel=True)
def fwht_rows(x, scale):
    """In place: every row of ``x`` (m, 2^k) becomes ``scale * H x_row``.

    ``H`` is the Sylvester Hadamard matrix (entries +-1, natural order), so
    ``scale = 2^(-k/2)`` makes the transform orthonormal. Butterflies in the
    usual order (:func:`fwht_row`); the sums are exact for dyadic data.
    """
    for i in prange(x.shape[0]):
        fwht_row(x[i], scale)


# serialised when numba's threading layer is not thread-safe
guard_module(globals())
